//! The command's own terminal when `run --user` changes uid on a terminal, as `su --pty`
//! does: a command that shared root's terminal could push input into it with TIOCSTI, which
//! root's shell would run once op-bridge exits.
//!
//! op-bridge opens a pseudo-terminal, gives the command its own session with the pty as its
//! controlling terminal (on those of fds 0–2 that were the terminal), and relays bytes both
//! ways: the real terminal goes to raw mode, so Ctrl-C, Ctrl-Z and Ctrl-\ reach the pty's
//! line discipline, which signals the command's foreground group. The window size follows
//! the real terminal (SIGWINCH). The real terminal's settings are put back when the command
//! is stopped (job control) and at the end.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

/// What the child needs, between fork and exec, to attach to the pty.
#[derive(Debug, Clone, Copy)]
pub struct Attach {
    slave: RawFd,
    /// Which of fds 0, 1 and 2 were the terminal (the others stay as they were).
    fds: [bool; 3],
}

impl Attach {
    /// Runs in the child after fork: a new session whose controlling terminal is the pty.
    /// Only async-signal-safe system calls.
    pub fn apply(&self) -> io::Result<()> {
        // SAFETY: plain system calls on the current process and fds it inherited.
        unsafe {
            if libc::setsid() < 0 || libc::ioctl(self.slave, libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            for (fd, on_terminal) in self.fds.iter().enumerate() {
                if *on_terminal && libc::dup2(self.slave, fd as libc::c_int) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}

/// The pty and the threads relaying it.
pub struct Relay {
    master: Arc<OwnedFd>,
    /// Kept open for the life of the run: a restarted command attaches to the same pty.
    slave: OwnedFd,
    fds: [bool; 3],
    /// The real terminal's settings before raw mode.
    saved: libc::termios,
    closing: Arc<AtomicBool>,
    output: Option<std::thread::JoinHandle<()>>,
    /// The command's pid (its session and process group), for Ctrl-Z.
    command: Arc<AtomicI32>,
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: a query of a file descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

impl Relay {
    /// Opens a pty owned by `uid`:`gid` (the command's), with the real terminal's settings
    /// and size, puts the real terminal (stdin) in raw mode and starts relaying.
    pub fn open(uid: u32, gid: u32) -> io::Result<Relay> {
        // SAFETY: libc calls on fds this function owns; buffers sized as the calls require.
        let (master, slave, saved) = unsafe {
            let master =
                OwnedFd::from_raw_fd(check(libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC))?);
            check(libc::grantpt(master.as_raw_fd()))?;
            check(libc::unlockpt(master.as_raw_fd()))?;
            let mut name = [0 as libc::c_char; 128];
            let rc = libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let slave = OwnedFd::from_raw_fd(check(libc::open(
                name.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            ))?);
            check(libc::fchown(slave.as_raw_fd(), uid, gid))?;
            let mut saved: libc::termios = std::mem::zeroed();
            check(libc::tcgetattr(libc::STDIN_FILENO, &mut saved))?;
            check(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &saved))?;
            (master, slave, saved)
        };
        let fds = [is_tty(0), is_tty(1), is_tty(2)];
        let mut relay = Relay {
            master: Arc::new(master),
            slave,
            fds,
            saved,
            closing: Arc::new(AtomicBool::new(false)),
            output: None,
            command: Arc::new(AtomicI32::new(0)),
        };
        relay.resize();
        relay.enter_raw();
        relay.start_threads()?;
        Ok(relay)
    }

    /// The command now on the pty (after each start).
    pub fn set_command(&self, pid: i32) {
        self.command.store(pid, Ordering::Release);
    }

    pub fn attach(&self) -> Attach {
        Attach { slave: self.slave.as_raw_fd(), fds: self.fds }
    }

    fn start_threads(&mut self) -> io::Result<()> {
        let master = self.master.clone();
        let command = self.command.clone();
        let suspend =
            (self.saved.c_lflag & libc::ISIG != 0).then_some(self.saved.c_cc[libc::VSUSP]).filter(|&key| key != 0);
        std::thread::Builder::new().name("pty-in".into()).spawn(move || relay_input(&master, &command, suspend))?;
        let master = self.master.clone();
        let closing = self.closing.clone();
        let out_fd = if self.fds[1] { 1 } else { 2 };
        self.output = Some(
            std::thread::Builder::new()
                .name("pty-out".into())
                .spawn(move || relay_output(&master, out_fd, &closing))?,
        );
        Ok(())
    }

    /// Copies the real terminal's window size to the pty (the kernel then sends SIGWINCH to
    /// the command's foreground group).
    pub fn resize(&self) {
        // SAFETY: TIOCGWINSZ/TIOCSWINSZ with a winsize struct.
        unsafe {
            let mut size: libc::winsize = std::mem::zeroed();
            if libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut size) == 0 {
                libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size);
            }
        }
    }

    /// Raw mode, as `su --pty` and ssh set it: keys go to the pty, which interprets them for
    /// the command, and its output (already processed by the pty) is shown as is.
    pub fn enter_raw(&self) {
        let mut raw = self.saved;
        // SAFETY: cfmakeraw on a copy; tcsetattr on stdin.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSADRAIN, &raw);
        }
    }

    /// Puts the real terminal's settings back (before op-bridge stops, and at the end).
    pub fn restore(&self) {
        // SAFETY: tcsetattr on stdin with the settings read at open.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSADRAIN, &self.saved) };
    }

    /// After the command's exit: lets the output relay show what is left (bounded), then
    /// restores the terminal.
    pub fn finish(mut self) {
        self.closing.store(true, Ordering::Release);
        if let Some(output) = self.output.take() {
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            while !output.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.restore();
    }
}

/// The real terminal's input to the pty. While op-bridge is in the background a read fails
/// (EIO, SIGTTIN being blocked): it is retried. End of input ends the relay.
///
/// The suspend key (Ctrl-Z) is the exception while the command's own group is the pty's
/// foreground: that group has no parent in its session, so the kernel discards the SIGTSTP
/// the pty would send it (an orphaned process group). The command's group gets SIGSTOP
/// instead, and the init loop sees it stop and stops op-bridge too, as on a shared terminal.
/// A shell running as the command keeps Ctrl-Z for its own jobs.
fn relay_input(master: &OwnedFd, command: &AtomicI32, suspend: Option<u8>) {
    // SAFETY: fd 0 stays open for the life of the process; ManuallyDrop never closes it.
    let mut stdin = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(libc::STDIN_FILENO) });
    let Ok(writer) = master.try_clone() else { return };
    let mut to_pty = std::fs::File::from(writer);
    let mut buf = zeroize::Zeroizing::new([0u8; 4096]);
    loop {
        match stdin.read(&mut buf[..]) {
            Ok(0) => return,
            Ok(n) => {
                let mut rest = &buf[..n];
                while let Some(at) = suspend.and_then(|key| rest.iter().position(|&b| b == key)) {
                    let pid = command.load(Ordering::Acquire);
                    // SAFETY: queries and signals of the command's own process group.
                    let own_group = pid > 0 && unsafe { libc::tcgetpgrp(master.as_raw_fd()) } == pid;
                    if !own_group {
                        break;
                    }
                    if to_pty.write_all(&rest[..at]).is_err() {
                        return;
                    }
                    // SAFETY: as above.
                    unsafe { libc::kill(-pid, libc::SIGSTOP) };
                    rest = &rest[at + 1..];
                }
                if to_pty.write_all(rest).is_err() {
                    return;
                }
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// The pty's output to the real terminal, until the pty is closed or, once `closing`, it
/// has been quiet for a moment.
fn relay_output(master: &OwnedFd, out_fd: RawFd, closing: &AtomicBool) {
    let mut buf = [0u8; 4096];
    loop {
        let mut poll = libc::pollfd { fd: master.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, 100) };
        if ready == 0 {
            if closing.load(Ordering::Acquire) {
                return;
            }
            continue;
        }
        if ready < 0 {
            continue; // EINTR
        }
        // SAFETY: read into a buffer of its length.
        let n = unsafe { libc::read(master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return; // EIO: no process has the pty open any more
        }
        let mut written = 0;
        while written < n as usize {
            // SAFETY: write from the part of the buffer not yet written.
            let w = unsafe { libc::write(out_fd, buf[written..].as_ptr().cast(), n as usize - written) };
            if w <= 0 {
                break;
            }
            written += w as usize;
        }
    }
}
