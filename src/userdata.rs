//! The data disk of a new machine, made the way docker-machine and
//! podman-machine made boot2docker's and boot2podman's: a sparse raw file
//! whose first bytes are a tar archive. Its first entry is named
//! `boot2podman, please format-me`, which tells the guest's init to keep
//! the first 4 KiB as `userdata.tar`, partition and format the disk
//! (`boot2podman-data`) and extract the tar into the user's home: that is
//! how `.ssh/authorized_keys` reaches the machine.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// The entry name the guest init looks for at the start of a disk.
pub const FORMAT_ME: &str = "boot2podman, please format-me";

/// The guest keeps only this much of the disk as userdata.tar.
pub const USERDATA_MAX: usize = 4096;

/// The tar the guest extracts into /home/tc and /root: the format-me
/// marker, then `.ssh/` and `.ssh/authorized_keys` holding `public_key`.
pub fn userdata_tar(public_key: &str) -> io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    // Owner root, mtime 0: the same key gives the same bytes.
    let mut append = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_path(path)?;
        h.set_cksum();
        b.append(&h, data)
    };
    append(FORMAT_ME, tar::EntryType::Regular, 0o644, b"")?;
    append(".ssh/", tar::EntryType::Directory, 0o700, b"")?;
    let key = format!("{}\n", public_key.trim_end());
    append(
        ".ssh/authorized_keys",
        tar::EntryType::Regular,
        0o600,
        key.as_bytes(),
    )?;
    let tar = b.into_inner()?;
    if tar.len() > USERDATA_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "the SSH public key is too long for the guest's {USERDATA_MAX}-byte userdata.tar"
            ),
        ));
    }
    Ok(tar)
}

/// Creates `path` (which must not exist) as a sparse disk of `size` bytes
/// starting with the userdata tar.
pub fn create_disk(path: &Path, size: u64, public_key: &str) -> io::Result<()> {
    let tar = userdata_tar(public_key)?;
    let mut f: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // 0600 whatever the umask: the disk holds the guest's data.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(&tar)?;
    f.set_len(size)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_starts_with_the_marker_and_carries_the_key() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExample b2p-test";
        let tar = userdata_tar(key).unwrap();
        // The init matches the first entry's name at byte 0 of the disk.
        assert!(tar.starts_with(FORMAT_ME.as_bytes()));
        assert!(tar.len() <= USERDATA_MAX);
        let mut a = tar::Archive::new(&tar[..]);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().display().to_string();
            let mut body = String::new();
            io::Read::read_to_string(&mut e, &mut body).unwrap();
            seen.push((path, body));
        }
        assert_eq!(seen[0].0, FORMAT_ME);
        assert_eq!(seen[1].0, ".ssh/");
        assert_eq!(seen[2], (".ssh/authorized_keys".into(), format!("{key}\n")));
    }

    #[test]
    fn oversized_key_is_refused() {
        assert!(userdata_tar(&"x".repeat(8192)).is_err());
    }
}
