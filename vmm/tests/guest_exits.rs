//! How a guest can end, end to end through the `b2p-vmm` binary with tiny
//! hand-assembled guests (an ELF vmlinux entered in 64-bit mode): i8042
//! reset, ACPI S5, triple fault, an emulation failure, a vCPU stuck in `hlt`
//! stopped by SIGTERM, and serial output to a file. Needs /dev/kvm; without
//! it each test prints "SKIP: ..." and returns.

#[path = "../../tests/common/require.rs"]
mod require;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const LOAD_ADDR: u64 = 0x10_0000;

fn kvm_usable() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            require::skip(&format!("/dev/kvm not usable: {e}"));
            false
        }
    }
}

/// A minimal ELF64 executable: one PT_LOAD of `code` at 1 MiB, entry there.
fn elf(code: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000];
    f[0..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = &mut f[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.extend_from_slice(code);
    f
}

struct Guest {
    dir: PathBuf,
    kernel: PathBuf,
}

impl Guest {
    fn new(name: &str, code: &[u8]) -> Guest {
        let dir = std::env::temp_dir().join(format!("b2p-vmm-test-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("guest.elf");
        std::fs::File::create(&kernel)
            .unwrap()
            .write_all(&elf(code))
            .unwrap();
        Guest { dir, kernel }
    }

    fn cmd(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_b2p-vmm"));
        c.arg("run")
            .arg("--kernel")
            .arg(&self.kernel)
            .args(["--memory", "64", "--cmdline", "x"])
            .args(extra)
            .stdin(Stdio::null());
        c
    }

    fn run(&self, extra: &[&str]) -> Output {
        let mut child = self
            .cmd(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("b2p-vmm did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// out 0x80,al ; mov al,0xfe ; out 0x64,al ; hlt ; jmp .-1
const RESET: &[u8] = &[0xe6, 0x80, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

#[test]
fn i8042_reset_exits_zero() {
    if !kvm_usable() {
        return;
    }
    let g = Guest::new("reset", RESET);
    let o = g.run(&["--console", "none", "--timings"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("b2p-vmm: timing first_exit_us="),
        "{}",
        stderr(&o)
    );
}

#[test]
fn acpi_s5_exits_zero() {
    if !kvm_usable() {
        return;
    }
    // mov dx,0x600 ; mov al,0x34 ; out dx,al ; hlt
    let g = Guest::new("s5", &[0x66, 0xba, 0x00, 0x06, 0xb0, 0x34, 0xee, 0xf4]);
    let o = g.run(&["--console", "none"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

// xor eax,eax ; push rax ; push rax ; lidt [rsp] ; ud2
const TRIPLE_FAULT: &[u8] = &[0x31, 0xc0, 0x50, 0x50, 0x0f, 0x01, 0x1c, 0x24, 0x0f, 0x0b];

#[test]
fn triple_fault_exits_zero() {
    if !kvm_usable() {
        return;
    }
    // mov dx,0x3f8 ; mov al,'x' ; out dx,al: a guest that got as far as
    // its console, then triple-faults (how some guests reboot).
    let mut code = vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'x', 0xee];
    code.extend_from_slice(TRIPLE_FAULT);
    let g = Guest::new("triple", &code);
    let o = g.run(&["--console", "none"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn triple_fault_before_any_output_is_an_error() {
    if !kvm_usable() {
        return;
    }
    let g = Guest::new("triple-silent", TRIPLE_FAULT);
    let o = g.run(&["--console", "none"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("triple-faulted before") && err.contains("guest.elf"),
        "{err}"
    );
}

#[test]
fn boot_timer_and_serial_to_file() {
    if !kvm_usable() {
        return;
    }
    // mov dx,0x3f8 ; mov al,'O' ; out dx,al ; mov al,'K' ; out dx,al ; mov al,10 ; out dx,al
    // mov rbx,0xc0000000 ; mov byte [rbx],123 ; then the reset sequence
    let mut code = vec![
        0x66, 0xba, 0xf8, 0x03, 0xb0, b'O', 0xee, 0xb0, b'K', 0xee, 0xb0, 10, 0xee, 0x48, 0xbb,
    ];
    code.extend_from_slice(&0xc000_0000u64.to_le_bytes());
    code.extend_from_slice(&[0xc6, 0x03, 123]);
    code.extend_from_slice(RESET);
    let g = Guest::new("serial", &code);
    let log = g.dir.join("console.log");
    let console = format!("file:{}", log.display());
    let o = g.run(&["--console", &console, "--boot-timer", "--timings"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "OK\n");
    assert!(
        stderr(&o).contains("b2p-vmm: timing boot_timer_us="),
        "{}",
        stderr(&o)
    );
}

#[test]
fn emulation_failure_names_rip_and_bytes() {
    if !kvm_usable() {
        return;
    }
    // mov rax,0xd0000000 ; jmp rax  -- executes from the MMIO hole (no RAM):
    // KVM cannot emulate an instruction fetch from MMIO.
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&0xd000_0000u64.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xe0]);
    let g = Guest::new("emul", &code);
    let o = g.run(&["--console", "none"]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("b2p-vmm: error: vCPU 0: "), "{err}");
    assert!(err.contains("RIP 0x"), "{err}");
    assert!(err.contains("instruction bytes"), "{err}");
}

fn wait_exit(child: &mut std::process::Child, secs: u64) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("b2p-vmm did not stop within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn sigterm_and_sigint_stop_cleanly() {
    if !kvm_usable() {
        return;
    }
    // out 0x80,al ; cli ; hlt ; jmp .-1  (halted forever, interrupts off)
    let g = Guest::new("halt", &[0xe6, 0x80, 0xfa, 0xf4, 0xeb, 0xfd]);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut child = g
            .cmd(&["--console", "none", "--cpus", "2", "--timings"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the guest runs (first exit printed) before signalling.
        let mut err = child.stderr.take().unwrap();
        let mut seen = String::new();
        let mut buf = [0u8; 256];
        while !seen.contains("first_exit_us") {
            let n = std::io::Read::read(&mut err, &mut buf).unwrap();
            assert!(n > 0, "b2p-vmm ended early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = wait_exit(&mut child, 20);
        assert!(status.success(), "signal {sig}: {status:?}");
    }
}

#[test]
fn not_a_kernel_is_one_line() {
    let g = Guest::new("bad", &[]);
    std::fs::write(&g.kernel, b"definitely not a kernel").unwrap();
    let o = g.run(&["--console", "none"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not a Linux kernel"), "{err}");
}

#[test]
fn stdin_tty_is_raw_for_the_guest_and_restored() {
    if !kvm_usable() {
        return;
    }
    if Command::new("script").arg("--version").output().is_err() {
        require::skip("script(1) (util-linux) is not installed: no pseudo-terminal to test with");
        return;
    }
    // Echo every received byte back; on 'q' reset.
    // 0: mov dx,0x3fd ; in al,dx ; test al,1 ; jz 0
    // 9: mov dx,0x3f8 ; in al,dx ; out dx,al ; cmp al,'q' ; jne 0 ; reset
    let mut code = vec![
        0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7, 0x66, 0xba, 0xf8, 0x03, 0xec, 0xee,
        0x3c, b'q', 0x75, 0xed,
    ];
    code.extend_from_slice(RESET);
    let g = Guest::new("tty", &code);
    let inner = format!(
        "{} run --kernel {} --memory 64 --cmdline x; echo RC=$?; stty -a",
        env!("CARGO_BIN_EXE_b2p-vmm"),
        g.kernel.display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // ^C must reach the guest as a byte, not stop the VMM.
    stdin.write_all(b"hi\x03q").unwrap();
    let status = wait_exit(&mut child, 30);
    drop(stdin);
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{out}");
    assert!(
        out.starts_with("hi\u{3}q"),
        "guest echo (no local echo): {out:?}"
    );
    assert!(out.contains("RC=0"), "{out:?}");
    // The terminal is back in canonical mode with echo after the VM ends.
    assert!(out.contains(" icanon") && out.contains(" echo "), "{out:?}");
}

/// SIGHUP (the terminal went away) and SIGQUIT (^\\ from another shell)
/// stop the VM like SIGTERM: exit 0 and the terminal back as it was.
#[test]
fn sighup_and_sigquit_restore_the_terminal() {
    if !kvm_usable() {
        return;
    }
    if Command::new("script").arg("--version").output().is_err() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP: script(1) (util-linux) is not installed: no pseudo-terminal to test with"
        );
        return;
    }
    // Poll the serial port forever (the terminal is the console's input).
    // 0: mov dx,0x3fd ; in al,dx ; jmp 0
    let g = Guest::new("tty-signals", &[0x66, 0xba, 0xfd, 0x03, 0xec, 0xeb, 0xfa]);
    for sig in ["HUP", "QUIT"] {
        // No job control in sh -c: the background VM stays in the
        // terminal's foreground process group, so it takes the terminal.
        let inner = format!(
            "{} run --kernel {} --memory 64 --cmdline x & p=$!; sleep 1; kill -{sig} $p; wait $p; echo RC=$?; stty -a",
            env!("CARGO_BIN_EXE_b2p-vmm"),
            g.kernel.display()
        );
        let mut child = Command::new("script")
            .args(["-qec", &inner, "/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let status = wait_exit(&mut child, 30);
        drop(stdin);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
        assert!(status.success(), "SIG{sig}: {out}");
        assert!(out.contains("RC=0"), "SIG{sig}: {out:?}");
        assert!(
            out.contains(" icanon") && out.contains(" echo "),
            "SIG{sig}: the terminal stayed raw: {out:?}"
        );
    }
}
