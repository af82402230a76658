//! A running VM: [`Vm::start`] builds everything from a [`VmConfig`] (in the
//! order that is cheapest on KVM) and starts one thread per vCPU plus the
//! event loop; [`Vm::wait`] returns how the guest ended; [`Vm::stop`] and
//! [`StopHandle`] end it from outside.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use b2p_devices::legacy::boot_timer::monotonic_ns;
use b2p_devices::legacy::{EventSink, LegacyEvent};
use event_manager::SubscriberOps;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

use crate::builder::{self, Devices, HostInputs, StageClock};
use crate::config::VmConfig;
use crate::console::{ConsoleInput, TerminalGuard};
use crate::error::{Error, Result};
use crate::event_loop::{EventLoop, Subscriber};
use crate::vcpu::{self, Vcpu};
use crate::GuestMemoryMmap;

/// How the guest ended (all of these make `b2p-vmm` exit 0; a triple
/// fault before the guest wrote to its console is
/// [`Error::TripleFaultBeforeOutput`] instead).
#[derive(Debug)]
pub enum VmExit {
    /// ACPI S5 or a KVM shutdown system event.
    PowerOff,
    /// i8042 reset or a KVM reset system event.
    Reset,
    /// KVM_EXIT_SHUTDOWN: the guest triple-faulted (also how some guests reboot).
    TripleFault,
    /// KVM reported a guest crash (system event).
    Crash,
    /// Another KVM system event.
    SystemEvent(u32),
    /// [`Vm::stop`] was called (SIGTERM/SIGINT in `b2p-vmm`).
    Stopped,
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::PowerOff => write!(f, "guest powered off"),
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::TripleFault => write!(f, "guest triple fault (shutdown)"),
            VmExit::Crash => write!(f, "guest crashed"),
            VmExit::SystemEvent(k) => write!(f, "KVM system event {k}"),
            VmExit::Stopped => write!(f, "stopped"),
        }
    }
}

/// Milestones in µs since the process (or VM) started.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// The first vCPU exit of any kind (≈ first guest instruction).
    pub first_exit_us: Option<u64>,
    /// The first byte the guest wrote to the serial transmitter (THR).
    pub first_serial_us: Option<u64>,
    /// The boot-timer write.
    pub boot_timer_us: Option<u64>,
}

/// State shared by the vCPU threads, the devices and the handle.
pub struct Shared {
    outcome: Mutex<Option<Result<VmExit>>>,
    cond: Condvar,
    pub(crate) stopping: AtomicBool,
    start_ns: u64,
    print_timings: bool,
    first_exit_us: AtomicU64,
    first_serial_us: AtomicU64,
    boot_timer_us: AtomicU64,
}

const UNSET: u64 = u64::MAX;

impl Shared {
    fn new(start_ns: u64, print_timings: bool) -> Self {
        Shared {
            outcome: Mutex::new(None),
            cond: Condvar::new(),
            stopping: AtomicBool::new(false),
            start_ns,
            print_timings,
            first_exit_us: AtomicU64::new(UNSET),
            first_serial_us: AtomicU64::new(UNSET),
            boot_timer_us: AtomicU64::new(UNSET),
        }
    }

    fn since_start_us(&self) -> u64 {
        monotonic_ns().saturating_sub(self.start_ns) / 1000
    }

    /// Record the first vCPU exit (cheap after the first call).
    pub(crate) fn note_first_exit(&self) {
        if self.first_exit_us.load(Ordering::Relaxed) != UNSET {
            return;
        }
        let us = self.since_start_us();
        if self
            .first_exit_us
            .compare_exchange(UNSET, us, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            && self.print_timings
        {
            eprintln!("b2p-vmm: timing first_exit_us={us}");
        }
    }

    /// Record the first serial output byte (the serial device calls this
    /// once, from its first-output hook).
    fn note_first_serial(&self) {
        let us = self.since_start_us();
        if self
            .first_serial_us
            .compare_exchange(UNSET, us, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
            && self.print_timings
        {
            eprintln!("b2p-vmm: timing first_serial_us={us}");
        }
    }

    fn note_boot_complete(&self, us: u64) {
        if self
            .boot_timer_us
            .compare_exchange(UNSET, us, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            if self.print_timings {
                eprintln!("b2p-vmm: timing boot_timer_us={us}");
            } else {
                log::info!("guest boot complete after {us} us");
            }
        }
    }

    /// End the VM with `outcome` (the first outcome wins).
    pub(crate) fn finish(&self, outcome: Result<VmExit>) {
        let mut g = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(outcome);
            if self.print_timings {
                eprintln!("b2p-vmm: timing vm_end_us={}", self.since_start_us());
            }
        }
        self.stopping.store(true, Ordering::Release);
        self.cond.notify_all();
    }

    fn timings(&self) -> Timings {
        let get = |a: &AtomicU64| Some(a.load(Ordering::Acquire)).filter(|v| *v != UNSET);
        Timings {
            first_exit_us: get(&self.first_exit_us),
            first_serial_us: get(&self.first_serial_us),
            boot_timer_us: get(&self.boot_timer_us),
        }
    }
}

/// Ends a VM from any thread (e.g. a signal-handling thread).
#[derive(Clone)]
pub struct StopHandle(Arc<Shared>);

impl StopHandle {
    /// Ask the VM to stop; [`Vm::wait`] then returns [`VmExit::Stopped`].
    pub fn stop(&self) {
        self.0.finish(Ok(VmExit::Stopped));
    }
}

/// Opens the vCPUs' start gate when dropped.
struct OpenOnDrop(Arc<crate::seccomp::Gate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// A running VM.
pub struct Vm {
    shared: Arc<Shared>,
    vcpu_threads: Vec<JoinHandle<()>>,
    event_loop: Option<EventLoop>,
    terminal: Option<TerminalGuard>,
    /// Named when the guest triple-faults before any console output.
    kernel: std::path::PathBuf,
    // Keep KVM objects and guest memory alive until the vCPU threads are gone.
    _vm_fd: Arc<kvm_ioctls::VmFd>,
    _mem: GuestMemoryMmap,
    /// `--net passt` and `--fs path=` processes, ended after the devices
    /// (dropped after teardown).
    _passt: Vec<crate::child::Helper>,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Io { what, source }
}

/// Raises the soft open-file limit to the hard one: the vsock device alone may
/// hold 1024 pending handshakes and 1024 connections, past the usual soft
/// limit of 1024. A failure only means fewer concurrent streams.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::debug!(
                    "setrlimit(RLIMIT_NOFILE): {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

impl Vm {
    /// Validate `config`, build the VM and start its vCPUs.
    pub fn start(config: VmConfig) -> Result<Vm> {
        let clock = StageClock {
            start_ns: config.start_ns.unwrap_or_else(monotonic_ns),
            enabled: config.timings,
        };
        config.validate()?;
        config.check_host_memory()?;
        crate::seccomp::prepare()?;
        raise_fd_limit();
        clock.stage("vm_start");
        let mut inputs = HostInputs::open(&config)?;
        let (kvm, vm_fd, mem) = builder::create_vm(&config)?;
        clock.stage("kvm_vm");

        let shared = Arc::new(Shared::new(clock.start_ns, config.timings));
        let sink = shared.clone();
        let events: EventSink = Arc::new(move |e| match e {
            LegacyEvent::PowerOff => sink.finish(Ok(VmExit::PowerOff)),
            LegacyEvent::Reset => sink.finish(Ok(VmExit::Reset)),
            LegacyEvent::BootComplete { since_start_us } => sink.note_boot_complete(since_start_us),
        });
        let output = inputs.console.take_output();
        let (devices, vcpu_fds) = std::thread::scope(|s| -> Result<_> {
            // The PIT (its kernel thread can take milliseconds to start on a
            // busy host) is created, and the supported CPUID fetched, while
            // the image loads.
            let helper = s.spawn(|| -> Result<_> {
                crate::kvm::setup_pit_and_pic(&vm_fd)?;
                kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(|source| Error::Kvm {
                        what: "KVM_GET_SUPPORTED_CPUID",
                        source,
                    })
            });
            let devices =
                builder::create_devices(&config, &vm_fd, &mem, output, events, clock.start_ns)?;
            clock.stage("devices");
            let cmdline = builder::guest_cmdline(&config, &devices.manager.virtio_slots);
            let entry = builder::load_guest_image(&config, &mem, &mut inputs, &cmdline)?;
            clock.stage("guest_image");
            let supported = helper
                .join()
                .map_err(|_| Error::Device("KVM setup thread panicked".into()))??;
            let vcpu_fds = builder::create_vcpus(&vm_fd, &supported, config.vcpus, entry)?;
            clock.stage("vcpus");
            // Every disk is locked and nothing is left to refuse: only now
            // may the console file be emptied.
            inputs.console.commit()?;
            Ok((devices, vcpu_fds))
        })?;
        Self::launch(config, clock, vm_fd, mem, shared, devices, vcpu_fds)
    }

    /// Start the console input, the event loop and the vCPU threads.
    fn launch(
        config: VmConfig,
        clock: StageClock,
        vm_fd: kvm_ioctls::VmFd,
        mem: GuestMemoryMmap,
        shared: Arc<Shared>,
        devices: Devices,
        vcpu_fds: Vec<kvm_ioctls::VcpuFd>,
    ) -> Result<Vm> {
        let Devices {
            manager,
            mut event_manager,
            serial,
            input_ready,
            passt,
        } = devices;
        let first_serial = shared.clone();
        serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .on_first_output(Box::new(move || first_serial.note_first_serial()));
        let terminal = match input_ready {
            Some(ready) => {
                let guard = TerminalGuard::raw(libc::STDIN_FILENO)?;
                let input: Subscriber = Arc::new(Mutex::new(ConsoleInput::new(serial, ready)));
                event_manager.add_subscriber(input);
                Some(guard)
            }
            None => None,
        };
        let event_loop = EventLoop::start(event_manager)?;
        let pio = Arc::new(manager.pio);
        let mmio = Arc::new(manager.mmio);
        let mut vm = Vm {
            shared: shared.clone(),
            vcpu_threads: Vec::with_capacity(config.vcpus),
            event_loop: Some(event_loop),
            terminal,
            kernel: config.kernel.clone(),
            _vm_fd: Arc::new(vm_fd),
            _mem: mem.clone(),
            _passt: passt,
        };
        clock.stage("vm_ready");
        // The vCPUs wait until every filter is in place (the gate opens on
        // every path out of here).
        let gate = Arc::new(crate::seccomp::Gate::default());
        let _open_gate = OpenOnDrop(gate.clone());
        for (index, fd) in vcpu_fds.into_iter().enumerate() {
            let v = Vcpu {
                index,
                fd,
                pio: pio.clone(),
                mmio: mmio.clone(),
                mem: mem.clone(),
                shared: shared.clone(),
            };
            let on_panic = shared.clone();
            let gate = gate.clone();
            let t = std::thread::Builder::new()
                .name(format!("b2p-vcpu{index}"))
                .spawn(move || {
                    let sandboxed = crate::seccomp::apply(crate::seccomp::Role::Vcpu);
                    gate.wait();
                    if let Err(e) = sandboxed {
                        on_panic.finish(Err(e.into()));
                        return;
                    }
                    // A bug must end the VM, not leave wait() hanging: under
                    // panic = "unwind" (debug builds, embedders) this ends it
                    // with an error; release builds of our binaries abort the
                    // whole process on a panic instead (panic = "abort").
                    let run = std::panic::AssertUnwindSafe(|| v.run());
                    if std::panic::catch_unwind(run).is_err() {
                        on_panic.finish(Err(Error::Vcpu {
                            vcpu: index,
                            reason: "the vCPU thread panicked".into(),
                        }));
                    }
                })
                .map_err(io("spawning a vCPU thread"))?;
            vm.vcpu_threads.push(t);
        }
        crate::seccomp::enter_main()?;
        Ok(vm)
    }

    /// A handle that stops this VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.shared.clone())
    }

    /// Ask the VM to stop ([`Vm::wait`] returns [`VmExit::Stopped`]).
    pub fn stop(&self) {
        self.stop_handle().stop();
    }

    /// Whether the VM has ended (or is ending).
    pub fn has_ended(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// Boot milestones so far.
    pub fn timings(&self) -> Timings {
        self.shared.timings()
    }

    /// Time from start to the guest's boot-timer write, once it happened.
    pub fn boot_time(&self) -> Option<Duration> {
        self.timings().boot_timer_us.map(Duration::from_micros)
    }

    /// Wait until the guest ends (or [`Vm::stop`]), tear the VM down and say how it ended.
    pub fn wait(mut self) -> Result<VmExit> {
        let outcome = {
            let mut g = self
                .shared
                .outcome
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            while g.is_none() {
                g = self.shared.cond.wait(g).unwrap_or_else(|p| p.into_inner());
            }
            g.take()
        };
        self.teardown();
        if self.shared.print_timings {
            eprintln!(
                "b2p-vmm: timing torn_down_us={}",
                self.shared.since_start_us()
            );
        }
        match outcome.unwrap_or(Ok(VmExit::Stopped)) {
            // A kernel that faults before it says anything (truncated, or
            // not for this machine) is an error, not a reboot.
            Ok(VmExit::TripleFault) if self.shared.timings().first_serial_us.is_none() => {
                Err(Error::TripleFaultBeforeOutput {
                    kernel: self.kernel.clone(),
                })
            }
            other => other,
        }
    }

    /// Stop the vCPUs (kicking them out of KVM_RUN), the event loop, and
    /// restore the terminal.
    fn teardown(&mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        let sig = vcpu::kick_signal();
        let threads = std::mem::take(&mut self.vcpu_threads);
        for _ in 0..1000 {
            if threads.iter().all(|t| t.is_finished()) {
                break;
            }
            for t in threads.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the pthread is alive (not finished, not joined).
                unsafe { libc::pthread_kill(t.as_pthread_t(), sig) };
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in threads {
            if t.is_finished() {
                let _ = t.join();
            } else {
                // Stuck outside KVM_RUN (e.g. writing to a blocked stdout): leave
                // it detached rather than hang; it owns what it still uses.
                log::warn!("a vCPU thread did not stop within 1 s; leaving it behind");
            }
        }
        if let Some(mut el) = self.event_loop.take() {
            el.stop();
        }
        self.terminal.take();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.vcpu_threads.is_empty() || self.event_loop.is_some() {
            self.shared.finish(Ok(VmExit::Stopped));
            self.teardown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        fn send<T: Send>() {}
        fn send_sync<T: Send + Sync>() {}
        send::<Vm>();
        send_sync::<StopHandle>();
        send_sync::<Error>();
    }
}
