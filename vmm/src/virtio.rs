//! Building the virtio devices a [`VmConfig`] asks for and wiring them
//! through the [`DeviceManager`].

use std::sync::{Arc, Mutex};

use b2p_devices::virtio::balloon::{Balloon, BalloonConfig};
use b2p_devices::virtio::block::{Block, BlockConfig};
use b2p_devices::virtio::fs::Fs;
use b2p_devices::virtio::net::passt::PasstBackend;
use b2p_devices::virtio::net::{Net, NetConfig as NetDeviceConfig};
use b2p_devices::virtio::rng::Rng;
use b2p_devices::virtio::vsock::device::Vsock;
use b2p_devices::virtio::vsock::VsockConfig as VsockDeviceConfig;
use kvm_ioctls::VmFd;

use crate::config::{FsBackend, NetBackend, VmConfig};
use crate::devices::DeviceManager;
use crate::error::{Error, Result};
use crate::event_loop::Manager;
use crate::GuestMemoryMmap;

/// Create and wire every virtio device of `config`, in a fixed order
/// (disks, nets, vsock, fs, rng, balloon) so DSDT node names stay stable. The
/// helper processes started for `--net passt` and `--fs path=` go to `passt`.
pub fn add_devices(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    events: &mut Manager,
    devices: &mut DeviceManager,
    passt: &mut Vec<crate::child::Helper>,
) -> Result<()> {
    for disk in &config.disks {
        let name = format!("disk {}", disk.path.display());
        let block = Block::new(BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            serial: disk.serial.clone(),
        })
        .map_err(|e| Error::Device(e.to_string()))?;
        devices.add_virtio(vm, mem, events, Arc::new(Mutex::new(block)), &name)?;
    }
    for n in &config.nets {
        let net = match &n.backend {
            NetBackend::Tap { name } => Net::new(NetDeviceConfig {
                tap: name.clone(),
                mac: n.mac,
            })
            .map_err(|e| Error::Device(format!("--net {}: {e}", n.backend)))?,
            NetBackend::Passt { socket } => {
                let passt_err =
                    |e: &dyn std::fmt::Display| Error::Device(format!("--net {}: {e}", n.backend));
                let (fd, name) = match socket {
                    None => {
                        let (fd, process) = crate::passt::spawn().map_err(|e| passt_err(&e))?;
                        let name = format!("(pid {})", process.pid());
                        log::info!("--net passt: started passt, pid {}", process.pid());
                        passt.push(process);
                        (fd, name)
                    }
                    Some(path) => (
                        crate::passt::connect(path).map_err(|e| passt_err(&e))?,
                        format!("at {}", path.display()),
                    ),
                };
                let backend = PasstBackend::new(fd, name).map_err(|e| passt_err(&e))?;
                Net::with_backend(Box::new(backend), n.mac).map_err(|e| passt_err(&e))?
            }
        };
        let name = format!("net {}", n.backend);
        devices.add_virtio(vm, mem, events, Arc::new(Mutex::new(net)), &name)?;
    }
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(
            VsockDeviceConfig {
                guest_cid: u64::from(v.cid),
                uds_path: v.uds_path.clone(),
            },
            config.vsock_ports.clone(),
        )
        .map_err(|e| Error::Device(format!("virtio-vsock: {e}")))?;
        devices.add_virtio(vm, mem, events, Arc::new(Mutex::new(vsock)), "virtio-vsock")?;
    }
    for f in &config.fs {
        let fs_err = |e: &dyn std::fmt::Display| Error::Device(format!("--fs tag={}: {e}", f.tag));
        let sock = match &f.backend {
            FsBackend::Folder { path, read_only } => {
                let (sock, process) =
                    crate::virtiofsd::spawn(path, *read_only).map_err(|e| fs_err(&e))?;
                log::info!(
                    "--fs tag={}: started virtiofsd on {}{}, pid {}",
                    f.tag,
                    path.display(),
                    if *read_only { " (read-only)" } else { "" },
                    process.pid()
                );
                passt.push(process);
                sock
            }
            FsBackend::Socket(path) => crate::virtiofsd::connect(path).map_err(|e| fs_err(&e))?,
        };
        let fs = Fs::new(&f.tag, sock).map_err(|e| fs_err(&e))?;
        let name = format!("virtio-fs {}", f.tag);
        devices.add_virtio(vm, mem, events, Arc::new(Mutex::new(fs)), &name)?;
    }
    if config.virtio_rng {
        let rng = Rng::new().map_err(|e| Error::Device(format!("virtio-rng: {e}")))?;
        devices.add_virtio(vm, mem, events, Arc::new(Mutex::new(rng)), "virtio-rng")?;
    }
    if config.balloon {
        let balloon = Balloon::new(BalloonConfig::default())
            .map_err(|e| Error::Device(format!("virtio-balloon: {e}")))?;
        let balloon = Arc::new(Mutex::new(balloon));
        devices.add_virtio(vm, mem, events, balloon, "virtio-balloon")?;
    }
    Ok(())
}
