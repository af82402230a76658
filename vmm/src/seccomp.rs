//! Per-thread seccomp filters (seccompiler): one allowlist each for the vCPU
//! threads, the event-loop thread, the thread that started the VM (the
//! binaries' main thread) and device helper threads (`blk-worker`), each
//! installed by its own thread, with PR_SET_NO_NEW_PRIVS. The vCPUs run the
//! guest's first instruction only once every filter is in place: the event
//! loop and the device threads (spawned while the VM is built) report theirs
//! before their spawner goes on, and the vCPUs wait at a gate in `Vm::launch`
//! for their own and the main thread's. [`prepare`] also installs a
//! process-wide SIGSYS handler.
//!
//! Anything not on a thread's list (and `ioctl`s other than the listed
//! requests, `socket`s other than AF_UNIX, `mmap`/`mprotect` with PROT_EXEC)
//! raises SIGSYS; the handler writes one line naming the thread and the
//! system call number, then ends the whole process with status 159 (128 +
//! SIGSYS).
//!
//! [`set_mode`] chooses how much is filtered, process-wide: the library's
//! default is [`Mode::Threads`] (the threads the VM starts, not its
//! caller's); `b2p-vmm` and `b2p __run-vm` choose [`Mode::Process`], which
//! also filters the thread that calls [`crate::Vm::start`] (from the moment
//! its vCPUs exist; threads it spawns later inherit that filter);
//! `--no-seccomp` is [`Mode::Off`].
//!
//! A thread inherits its creator's filter and stacks its own on top, so
//! device threads must be spawned while the VM is being built (on the
//! thread calling `Vm::start`, before its filter), never from a vCPU or the
//! event loop.
//!
//! Debug builds only: `B2P_SECCOMP_SELFTEST=<role>` (vcpu, event-loop, main,
//! blk-worker) makes that thread issue one forbidden system call (getppid)
//! right after its filter is in place; the tests use it to see the process die.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule,
};

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {role} seccomp filter: {reason}")]
    Build { role: &'static str, reason: String },
    #[error("installing the {role} seccomp filter: {reason}")]
    Install { role: &'static str, reason: String },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("no seccomp filter for device thread role {0:?}")]
    UnknownRole(String),
    #[error("{0}")]
    BeforeGuest(String),
}

/// How much of the process the filters cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// No filters (`--no-seccomp`, for debugging).
    Off,
    /// vCPU, event-loop and device threads (the library's default).
    Threads,
    /// Those plus the thread that calls [`crate::Vm::start`].
    Process,
}

static MODE: AtomicU8 = AtomicU8::new(1);

/// Sets the mode for every VM this process starts from now on.
pub fn set_mode(mode: Mode) {
    MODE.store(mode as u8, Ordering::Release);
}

/// The current mode.
pub fn mode() -> Mode {
    match MODE.load(Ordering::Acquire) {
        0 => Mode::Off,
        1 => Mode::Threads,
        _ => Mode::Process,
    }
}

/// The kinds of thread that get a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Vcpu,
    EventLoop,
    Main,
    BlkWorker,
    /// The manager's published-ports forwarder (`b2p __run-vm`) and the
    /// threads it starts.
    Ports,
}

impl Role {
    /// The name used in messages and by `B2P_SECCOMP_SELFTEST`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vcpu => "vcpu",
            Role::EventLoop => "event-loop",
            Role::Main => "main",
            Role::BlkWorker => "blk-worker",
            Role::Ports => "ports",
        }
    }

    /// The role of a device thread spawned through `b2p_devices::threads`.
    pub fn of_device_thread(role: &str) -> Result<Role, SeccompError> {
        match role {
            "blk-worker" => Ok(Role::BlkWorker),
            other => Err(SeccompError::UnknownRole(other.to_string())),
        }
    }
}

// ioctl requests (x86_64 numbers; the unit tests check them against the
// kernel headers' values).
const KVMIO: u64 = 0xAE;
const fn io_nr(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | io_nr(nr)
}
const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | io_nr(nr)
}
const KVM_RUN: u64 = io_nr(0x80);
const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>() as u64);
const KVM_GET_SREGS: u64 = ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>() as u64);
const KVM_TRANSLATE: u64 = iowr(
    0x85,
    std::mem::size_of::<kvm_bindings::kvm_translation>() as u64,
);
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const FIONBIO: u64 = libc::FIONBIO;
const TCGETS: u64 = libc::TCGETS;
const TCSETS: u64 = libc::TCSETS;
const TCSETSW: u64 = libc::TCSETSW;
const TCSETSF: u64 = libc::TCSETSF;

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// fcntl commands for duplicating descriptors and their flags (no locks,
/// no F_SETOWN).
const FD_FLAGS: &[u64] = &[
    libc::F_GETFD as u64,
    libc::F_SETFD as u64,
    libc::F_GETFL as u64,
    libc::F_SETFL as u64,
    libc::F_DUPFD_CLOEXEC as u64,
];

fn cond(arg: u8, op: Op, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, Len::Qword, op, value).map_err(|e| e.to_string())
}

fn rule(conds: Vec<SeccompCondition>) -> Result<SeccompRule, String> {
    SeccompRule::new(conds).map_err(|e| e.to_string())
}

/// One rule per value: argument `arg` equals one of `values`.
fn arg_in(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, String> {
    values
        .iter()
        .map(|v| rule(vec![cond(arg, Op::Eq, *v)?]))
        .collect()
}

fn allow(rules: &mut Rules, syscalls: &[i64]) {
    for s in syscalls {
        rules.insert(*s, Vec::new());
    }
}

/// What every thread makes: the Rust runtime, memory allocation (never
/// executable), futexes, signal masks and returns, logging to stderr,
/// closing descriptors, sleeping, and ending the thread or process.
fn common() -> Result<Rules, String> {
    let mut r = Rules::new();
    allow(
        &mut r,
        &[
            libc::SYS_futex,
            libc::SYS_exit,
            libc::SYS_exit_group,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_sched_yield,
            libc::SYS_sched_getaffinity,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_write,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_restart_syscall,
            libc::SYS_getrandom,
        ],
    );
    let no_exec = || -> Result<Vec<SeccompRule>, String> {
        Ok(vec![rule(vec![cond(
            2,
            Op::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])?])
    };
    // Debug builds check an fd is open (F_GETFD) before closing it.
    r.insert(libc::SYS_fcntl, arg_in(1, &[libc::F_GETFD as u64])?);
    r.insert(libc::SYS_mmap, no_exec()?);
    r.insert(libc::SYS_mprotect, no_exec()?);
    // abort() (a panic under panic = "abort") raises SIGABRT at itself.
    r.insert(
        libc::SYS_tgkill,
        arg_in(
            2,
            &[libc::SIGABRT as u64, crate::vcpu::kick_signal() as u64],
        )?,
    );
    Ok(r)
}

fn rules_for(role: Role) -> Result<Rules, String> {
    let mut r = common()?;
    match role {
        Role::Vcpu => {
            // Exits (MMIO/PIO to the devices: eventfds, timerfds, the
            // console), device activation (eventfd clones, TAP offloads),
            // and the fault report (registers, address translation).
            allow(&mut r, &[libc::SYS_read, libc::SYS_timerfd_settime]);
            r.insert(libc::SYS_fcntl, arg_in(1, FD_FLAGS)?);
            r.insert(
                libc::SYS_ioctl,
                arg_in(
                    1,
                    &[
                        KVM_RUN,
                        KVM_GET_REGS,
                        KVM_GET_SREGS,
                        KVM_TRANSLATE,
                        TUNSETOFFLOAD,
                    ],
                )?,
            );
        }
        Role::EventLoop => {
            // Device backends: queue ioeventfds, TAP and passt frames, vsock
            // Unix sockets (accept, connect to `<uds>_<port>`), getrandom for
            // virtio-rng, the console flush timer; removing its sockets at
            // teardown (a stat first: only a socket is removed). Disk I/O is
            // the blk workers' (no pread/pwrite/fsync here).
            allow(
                &mut r,
                &[
                    libc::SYS_epoll_wait,
                    libc::SYS_epoll_pwait,
                    libc::SYS_epoll_ctl,
                    libc::SYS_read,
                    libc::SYS_readv,
                    libc::SYS_accept4,
                    libc::SYS_connect,
                    libc::SYS_recvfrom,
                    libc::SYS_recvmsg,
                    libc::SYS_sendto,
                    libc::SYS_sendmsg,
                    libc::SYS_shutdown,
                    libc::SYS_getsockopt,
                    libc::SYS_timerfd_settime,
                    libc::SYS_statx,
                    libc::SYS_newfstatat,
                    libc::SYS_fstat,
                    libc::SYS_unlink,
                ],
            );
            r.insert(libc::SYS_fcntl, arg_in(1, FD_FLAGS)?);
            r.insert(libc::SYS_socket, arg_in(0, &[libc::AF_UNIX as u64])?);
            r.insert(libc::SYS_ioctl, arg_in(1, &[FIONBIO, TUNSETOFFLOAD])?);
        }
        Role::BlkWorker => {
            // devices/src/virtio/block/worker.rs: poll on its two eventfds,
            // read to drain them, preadv/pwritev on the image, fdatasync,
            // fallocate (DISCARD, WRITE_ZEROES), write to the irqfd.
            allow(
                &mut r,
                &[
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_read,
                    libc::SYS_preadv,
                    libc::SYS_pwritev,
                    libc::SYS_fdatasync,
                    libc::SYS_fallocate,
                ],
            );
        }
        Role::Ports => {
            // The manager's src/ports.rs: loopback TCP listeners, Unix
            // connections to the machine's vsock socket, a thread per
            // connection, ports.json rewritten in place (opened before).
            allow(
                &mut r,
                &[
                    libc::SYS_read,
                    libc::SYS_recvfrom,
                    libc::SYS_recvmsg,
                    libc::SYS_sendto,
                    libc::SYS_sendmsg,
                    libc::SYS_connect,
                    libc::SYS_bind,
                    libc::SYS_listen,
                    libc::SYS_accept4,
                    libc::SYS_setsockopt,
                    libc::SYS_getsockopt,
                    libc::SYS_getsockname,
                    libc::SYS_shutdown,
                    libc::SYS_poll,
                    libc::SYS_ppoll,
                    libc::SYS_ftruncate,
                    libc::SYS_pwrite64,
                    libc::SYS_clone3,
                    libc::SYS_set_robust_list,
                    libc::SYS_rseq,
                ],
            );
            r.insert(
                libc::SYS_socket,
                arg_in(
                    0,
                    &[
                        libc::AF_UNIX as u64,
                        libc::AF_INET as u64,
                        libc::AF_INET6 as u64,
                    ],
                )?,
            );
            r.insert(
                libc::SYS_clone,
                vec![rule(vec![cond(
                    0,
                    Op::MaskedEq(libc::CLONE_THREAD as u64),
                    libc::CLONE_THREAD as u64,
                )?])?],
            );
            r.insert(libc::SYS_fcntl, arg_in(1, FD_FLAGS)?);
            r.insert(libc::SYS_prctl, arg_in(0, &[libc::PR_SET_NAME as u64])?);
            // glibc's first pthread_create in a process installs its
            // SIGSETXID handler (kernel signal 33, SIGRTMIN + 1 of glibc).
            r.insert(libc::SYS_rt_sigaction, arg_in(0, &[33])?);
        }
        Role::Main => {
            // Waiting for the guest, kicking and joining the vCPUs,
            // restoring the terminal, removing the manager's pid file, ending
            // the passt process it started, and
            // spawning the signal thread (which inherits this filter and
            // waits in rt_sigtimedwait). No open, rename or socket: what
            // must be written before the guest runs goes in
            // [`before_guest_starts`].
            allow(
                &mut r,
                &[
                    libc::SYS_clone3,
                    libc::SYS_set_robust_list,
                    libc::SYS_rseq,
                    libc::SYS_rt_sigtimedwait,
                    libc::SYS_unlink,
                ],
            );
            r.insert(
                libc::SYS_clone,
                vec![rule(vec![cond(
                    0,
                    Op::MaskedEq(libc::CLONE_THREAD as u64),
                    libc::CLONE_THREAD as u64,
                )?])?],
            );
            r.insert(libc::SYS_prctl, arg_in(0, &[libc::PR_SET_NAME as u64])?);
            // Ending and reaping the `--net passt` process at teardown.
            r.insert(
                libc::SYS_kill,
                arg_in(1, &[libc::SIGTERM as u64, libc::SIGKILL as u64])?,
            );
            allow(&mut r, &[libc::SYS_wait4]);
            r.insert(
                libc::SYS_ioctl,
                arg_in(1, &[TCGETS, TCSETS, TCSETSW, TCSETSF])?,
            );
        }
    }
    Ok(r)
}

fn build(role: Role) -> Result<BpfProgram, SeccompError> {
    let err = |reason: String| SeccompError::Build {
        role: role.name(),
        reason,
    };
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| err(e.to_string()))?;
    let filter = SeccompFilter::new(
        rules_for(role).map_err(err)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| err(e.to_string()))?;
    BpfProgram::try_from(filter).map_err(|e| err(e.to_string()))
}

struct Filters {
    vcpu: BpfProgram,
    event_loop: BpfProgram,
    main: BpfProgram,
    blk_worker: BpfProgram,
    ports: BpfProgram,
}

fn filters() -> Result<&'static Filters, SeccompError> {
    static FILTERS: OnceLock<Result<Filters, String>> = OnceLock::new();
    FILTERS
        .get_or_init(|| {
            let f = || -> Result<Filters, SeccompError> {
                Ok(Filters {
                    vcpu: build(Role::Vcpu)?,
                    event_loop: build(Role::EventLoop)?,
                    main: build(Role::Main)?,
                    blk_worker: build(Role::BlkWorker)?,
                    ports: build(Role::Ports)?,
                })
            };
            f().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|reason| SeccompError::Build {
            role: "every",
            reason: reason.clone(),
        })
}

/// What the thread calling [`crate::Vm::start`] does last before its own
/// filter goes on and the guest starts (once, in every mode).
type BeforeGuest = Box<dyn FnOnce() -> Result<(), String> + Send>;

static BEFORE_GUEST: Mutex<Option<BeforeGuest>> = Mutex::new(None);

/// Registers `f` to run on the thread calling [`crate::Vm::start`] once the
/// VM is built, just before that thread's filter is installed and the guest
/// runs (e.g. the manager writes its pid file there: the main filter allows
/// no open). Its error fails `Vm::start`.
pub fn before_guest_starts(f: impl FnOnce() -> Result<(), String> + Send + 'static) {
    *BEFORE_GUEST.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(f));
}

/// Runs the [`before_guest_starts`] hook, if any, then installs the main
/// thread's filter ([`Mode::Process`] only).
pub(crate) fn enter_main() -> Result<(), SeccompError> {
    let hook = BEFORE_GUEST
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(f) = hook {
        f().map_err(SeccompError::BeforeGuest)?;
    }
    apply(Role::Main)
}

/// Compiles the filters and installs the SIGSYS handler and the device
/// threads' start hook (once per process); a no-op in [`Mode::Off`]. Run
/// by [`crate::Vm::start`] before any thread of the VM exists.
pub fn prepare() -> Result<(), SeccompError> {
    if mode() == Mode::Off {
        return Ok(());
    }
    filters()?;
    PROGRAM.get_or_init(|| {
        let arg0 = std::env::args_os().next().unwrap_or_default();
        let name = std::path::Path::new(&arg0)
            .file_name()
            .map_or("b2p-vmm".into(), |n| n.to_string_lossy().into_owned());
        Box::leak(name.into_boxed_str())
    });
    install_sigsys_handler()?;
    b2p_devices::threads::set_start_hook(|role| {
        Role::of_device_thread(role)
            .and_then(apply)
            .map_err(|e| e.to_string())
    });
    Ok(())
}

/// Installs `role`'s filter on the calling thread (PR_SET_NO_NEW_PRIVS
/// first); a no-op in [`Mode::Off`], and for [`Role::Main`] unless the
/// mode is [`Mode::Process`].
pub fn apply(role: Role) -> Result<(), SeccompError> {
    match (mode(), role) {
        (Mode::Off, _) | (Mode::Threads, Role::Main) => return Ok(()),
        _ => {}
    }
    let f = filters()?;
    let prog = match role {
        Role::Vcpu => &f.vcpu,
        Role::EventLoop => &f.event_loop,
        Role::Main => &f.main,
        Role::BlkWorker => &f.blk_worker,
        Role::Ports => &f.ports,
    };
    let selftest = selftest_requested(role);
    THREAD_ROLE.with(|r| r.set(role.name()));
    pin_malloc_arenas();
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Install {
        role: role.name(),
        reason: e.to_string(),
    })?;
    if selftest {
        // SAFETY: getppid has no arguments and no side effects; the filter
        // turns it into SIGSYS.
        unsafe { libc::syscall(libc::SYS_getppid) };
    }
    Ok(())
}

/// glibc's malloc, the first time a process has more threads than 8 arenas,
/// reads /sys/devices/system/cpu/online (openat) to size its arena limit:
/// under a filter that is SIGSYS (a forwarder with a few dozen connection
/// threads died of it). Setting the limit first, to glibc's own default
/// (8 per CPU), leaves nothing to read.
fn pin_malloc_arenas() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>()
        // bytes into set; CPU_COUNT reads it; mallopt takes two ints.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            let n = if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) == 0 {
                libc::CPU_COUNT(&set).max(1)
            } else {
                2
            };
            libc::mallopt(libc::M_ARENA_MAX, 8 * n);
        }
    });
}

#[cfg(debug_assertions)]
fn selftest_requested(role: Role) -> bool {
    std::env::var_os("B2P_SECCOMP_SELFTEST").is_some_and(|v| v == role.name())
}

#[cfg(not(debug_assertions))]
fn selftest_requested(_: Role) -> bool {
    false
}

/// The program name the SIGSYS line starts with.
static PROGRAM: OnceLock<&'static str> = OnceLock::new();

thread_local! {
    /// The role whose filter this thread installed ("" for a thread that
    /// inherited its creator's, like the signal thread).
    static THREAD_ROLE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("") };
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    static RESULT: OnceLock<Result<(), i32>> = OnceLock::new();
    let r = RESULT.get_or_init(|| {
        // SAFETY: a zeroed sigaction with a valid handler and SA_SIGINFO;
        // the handler only calls async-signal-safe functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                sigsys_handler;
            sa.sa_sigaction = handler as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
            }
        }
        Ok(())
    });
    r.map_err(|e| SeccompError::Handler(std::io::Error::from_raw_os_error(e)))
}

/// The exit status of a process ended by a forbidden system call.
pub const EXIT_STATUS: i32 = 128 + libc::SIGSYS;

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo's SIGSYS member: si_call_addr (pointer) at 16, si_syscall
    // (int) at 24.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let role = THREAD_ROLE.with(|r| r.get());
    let mut buf = [0u8; 160];
    let mut len = 0;
    let mut push = |s: &[u8]| {
        let n = s.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&s[..n]);
        len += n;
    };
    push(PROGRAM.get().copied().unwrap_or("b2p-vmm").as_bytes());
    if role.is_empty() {
        push(b": error: seccomp: a thread made a forbidden system call (number ");
    } else {
        push(b": error: seccomp: the ");
        push(role.as_bytes());
        push(b" thread made a forbidden system call (number ");
    }
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = i64::from(nr).unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if nr < 0 {
        push(b"-");
    }
    push(&digits[i..]);
    push(b"); ending the process\n");
    // One line, even when several threads trip at once: the first writes it
    // and ends the process; the others wait for that.
    static REPORTED: AtomicBool = AtomicBool::new(false);
    // SAFETY: write, nanosleep and _exit are async-signal-safe and on every
    // allowlist.
    unsafe {
        if REPORTED.swap(true, Ordering::AcqRel) {
            let second = libc::timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            loop {
                libc::nanosleep(&second, std::ptr::null_mut());
            }
        }
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_STATUS);
    }
}

/// Holds the vCPU threads back until every thread's filter is in place.
#[derive(Default)]
pub(crate) struct Gate {
    open: Mutex<bool>,
    cond: Condvar,
}

impl Gate {
    pub(crate) fn wait(&self) {
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while !*g {
            g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub(crate) fn open(&self) {
        *self.open.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_TRANSLATE, 0xc018_ae85);
        assert_eq!(TUNSETOFFLOAD, libc::TUNSETOFFLOAD);
    }

    #[test]
    fn every_filter_compiles() {
        for role in [
            Role::Vcpu,
            Role::EventLoop,
            Role::Main,
            Role::BlkWorker,
            Role::Ports,
        ] {
            let prog = build(role).unwrap();
            assert!(!prog.is_empty(), "{role:?}");
        }
    }

    #[test]
    fn device_roles() {
        assert_eq!(
            Role::of_device_thread("blk-worker").unwrap(),
            Role::BlkWorker
        );
        assert!(Role::of_device_thread("net-worker").is_err());
    }

    /// A thread under the vCPU filter may make the calls on its list (the
    /// KVM_RUN ioctl number, here on a non-KVM fd: ENOTTY, not SIGSYS), and
    /// its /proc status says `Seccomp: 2`.
    #[test]
    fn a_filtered_thread_runs_what_its_list_allows() {
        filters().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            seccompiler::apply_filter(&filters().unwrap().vcpu).unwrap();
            // SAFETY: an ioctl on fd 0 with a null argument fails cleanly;
            // gettid has no preconditions.
            let rc = unsafe { libc::ioctl(0, KVM_RUN as _, 0) };
            let tid = unsafe { libc::gettid() };
            tx.send((rc, tid)).unwrap();
            let _ = done_rx.recv();
        });
        let (rc, tid) = rx.recv().unwrap();
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(rc, -1);
        assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    }
}
