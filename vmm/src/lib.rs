//! b2p-vmm: the b2p virtual machine monitor as a library.
//!
//! Build a [`VmConfig`] (or use [`VmBuilder`]), call [`Vm::start`], then
//! [`Vm::wait`] for the guest to end; [`Vm::stop`] / [`StopHandle`] end it
//! early. The `b2p-vmm` binary is a thin CLI over this; the `b2p` manager
//! embeds it the same way.
//!
//! ```no_run
//! use b2p_vmm::{Console, VmBuilder, VmExit};
//!
//! let vm = VmBuilder::new("/path/to/vmlinuz64")
//!     .initrd("/path/to/boot2podman.gz")
//!     .memory_mib(1024)
//!     .vcpus(2)
//!     .console(Console::File("/tmp/console.log".into()))
//!     .start()?;
//! let stop = vm.stop_handle(); // e.g. for a signal thread: stop.stop()
//! match vm.wait()? {
//!     VmExit::PowerOff | VmExit::Stopped => {}
//!     other => eprintln!("guest ended: {other}"),
//! }
//! # drop(stop);
//! # Ok::<(), b2p_vmm::Error>(())
//! ```
//!
//! Modules: [`config`] (what to build), `kvm` (VM, memory, irqchip),
//! `builder` (the build steps), `vcpu` (vCPU state and run loop), `devices` (buses, allocators, wiring),
//! `virtio` (device construction), `event_loop`, `console`, `vm`
//! (orchestration and lifecycle), [`cli`] (argument parsers shared with the
//! manager), [`image`] (where the default guest image is), [`signals`]
//! (SIGINT/SIGTERM stop the VM), [`logger`] (the binaries' stderr logger),
//! [`seccomp`] (per-thread filters).

mod builder;
mod child;
pub mod cli;
pub mod config;
mod console;
mod devices;
mod error;
mod event_loop;
pub mod image;
mod kvm;
pub mod logger;
mod memory;
pub mod passt;
pub mod seccomp;
pub mod signals;
mod vcpu;
mod virtio;
pub mod virtiofsd;
mod vm;

pub use config::{
    Console, DiskConfig, FsBackend, FsConfig, NetBackend, NetConfig, VmBuilder, VmConfig,
    VsockConfig,
};
pub use error::{Error, Result};
pub use vm::{StopHandle, Timings, Vm, VmExit};

/// CLOCK_MONOTONIC in nanoseconds: pass it as [`VmConfig::start_ns`] as
/// early as possible in `main` so timings count from process start.
pub use b2p_devices::legacy::boot_timer::monotonic_ns;

/// The locks every VM of a disk image holds (QEMU's OFD byte-range
/// locks): the manager's `set` takes them before it grows a disk.
pub mod disk_lock {
    pub use b2p_devices::virtio::block::lock::{lock_image, LockError};
}

/// Guest memory type used throughout.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
