//! Building the virtio devices a [`VmConfig`] asks for and wiring them
//! through the [`DeviceManager`].

use std::sync::{Arc, Mutex};

use b2p_devices::virtio::block::{Block, BlockConfig};
use b2p_devices::virtio::net::{Net, NetConfig as NetDeviceConfig};
use b2p_devices::virtio::rng::Rng;
use b2p_devices::virtio::vsock::device::Vsock;
use b2p_devices::virtio::vsock::VsockConfig as VsockDeviceConfig;
use kvm_ioctls::VmFd;

use crate::config::VmConfig;
use crate::devices::DeviceManager;
use crate::error::{Error, Result};
use crate::event_loop::Manager;
use crate::GuestMemoryMmap;

/// Create and wire every virtio device of `config`, in a fixed order
/// (disks, nets, vsock, rng) so DSDT node names stay stable.
pub fn add_devices(
    config: &VmConfig,
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    events: &mut Manager,
    devices: &mut DeviceManager,
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
        let net = Net::new(NetDeviceConfig {
            tap: n.tap.clone(),
            mac: n.mac,
        })
        .map_err(|e| Error::Device(format!("--net tap={}: {e}", n.tap)))?;
        let name = format!("net {}", n.tap);
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
    if config.virtio_rng {
        let rng = Rng::new().map_err(|e| Error::Device(format!("virtio-rng: {e}")))?;
        devices.add_virtio(vm, mem, events, Arc::new(Mutex::new(rng)), "virtio-rng")?;
    }
    Ok(())
}
