//! Where the default guest image lives: the kernel (`vmlinux`, else
//! `vmlinuz64`) and initramfs that `guest-image/build.sh` writes to
//! `$B2P_CACHE/image` (default `~/.cache/b2p/image`), used by `b2p-vmm run`
//! without `--kernel` and by the `b2p` manager's machines.

use std::path::{Path, PathBuf};

/// Why the default guest image cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("HOME is not set, so the default guest image cannot be found (set B2P_CACHE)")]
    NoHome,
    #[error("the default guest image is missing ({}); build it with guest-image/build.sh", .0.display())]
    Missing(PathBuf),
}

/// `$B2P_CACHE/image`, else `$HOME/.cache/b2p/image`.
pub fn default_image_dir() -> Result<PathBuf, ImageError> {
    if let Some(c) = std::env::var_os("B2P_CACHE").filter(|c| !c.is_empty()) {
        return Ok(PathBuf::from(c).join("image"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or(ImageError::NoHome)?;
    Ok(Path::new(&home).join(".cache/b2p/image"))
}

/// The initramfs to boot from `dir`: the legacy-lz4 one when built (it
/// unpacks in about half the time of gzip, guest-image/README.md), else
/// `boot2podman.gz`.
pub fn default_initrd(dir: &Path) -> PathBuf {
    let lz4 = dir.join("boot2podman.lz4");
    if lz4.is_file() {
        lz4
    } else {
        dir.join("boot2podman.gz")
    }
}

/// The kernel to boot from `dir`: the uncompressed ELF `vmlinux` when the
/// image ships one (booted through its PVH entry, no decompression in the
/// guest), else the bzImage `vmlinuz64`.
pub fn default_kernel(dir: &Path) -> PathBuf {
    let elf = dir.join("vmlinux");
    if elf.is_file() {
        elf
    } else {
        dir.join("vmlinuz64")
    }
}

/// Kernel and initrd of the default image, both checked to exist;
/// `initrd` overrides the image's initramfs.
pub fn default_image(initrd: Option<&Path>) -> Result<(PathBuf, PathBuf), ImageError> {
    let dir = default_image_dir()?;
    let kernel = default_kernel(&dir);
    let initrd = initrd.map_or_else(|| default_initrd(&dir), Path::to_path_buf);
    for f in [&kernel, &initrd] {
        if !f.is_file() {
            return Err(ImageError::Missing(f.clone()));
        }
    }
    Ok((kernel, initrd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_lz4_and_vmlinux_and_names_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("b2p-image-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(default_initrd(&dir), dir.join("boot2podman.gz"));
        std::fs::write(dir.join("boot2podman.lz4"), b"x").unwrap();
        assert_eq!(default_initrd(&dir), dir.join("boot2podman.lz4"));
        assert_eq!(default_kernel(&dir), dir.join("vmlinuz64"));
        std::fs::write(dir.join("vmlinux"), b"x").unwrap();
        assert_eq!(default_kernel(&dir), dir.join("vmlinux"));
        std::fs::remove_dir_all(&dir).unwrap();
        let e = ImageError::Missing("/x/vmlinuz64".into()).to_string();
        assert!(e.contains("/x/vmlinuz64") && e.contains("guest-image/build.sh"));
    }
}
