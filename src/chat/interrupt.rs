//! Ctrl-C for interactive chats: during a reply it stops the reply (the stream is cancelled
//! before its next token); anywhere else it ends the program as usual.
//!
//! Nothing happens until the application calls [`install`]; the library never installs a signal
//! handler on its own. Without it (or off Unix) [`requested`] is always `false`.

/// Marks a reply in progress until dropped; Ctrl-C in that time sets [`requested`].
#[derive(Debug)]
pub struct Replying(());

#[cfg(unix)]
mod imp {
    use std::sync::atomic::{AtomicBool, Ordering};

    static REPLYING: AtomicBool = AtomicBool::new(false);
    static REQUESTED: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_sigint(_: libc::c_int) {
        if REPLYING.load(Ordering::SeqCst) {
            REQUESTED.store(true, Ordering::SeqCst);
        } else {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(130) }
        }
    }

    pub fn install() {
        // SAFETY: the handler only touches atomics and calls _exit, both async-signal-safe.
        unsafe { libc::signal(libc::SIGINT, on_sigint as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t) };
    }

    pub fn requested() -> bool {
        REQUESTED.load(Ordering::SeqCst)
    }

    pub fn set_replying(on: bool) {
        if on {
            REQUESTED.store(false, Ordering::SeqCst);
        }
        REPLYING.store(on, Ordering::SeqCst);
    }
}

#[cfg(not(unix))]
mod imp {
    pub fn install() {}
    pub fn requested() -> bool {
        false
    }
    pub fn set_replying(_: bool) {}
}

/// Installs the SIGINT handler (calling it again is harmless). Call it after creating a line
/// editor that sets its own SIGINT handler (rustyline's `Editor::new` does): the last one wins.
pub fn install() {
    imp::install();
}

/// Whether Ctrl-C was pressed since the current [`Replying`] started.
pub fn requested() -> bool {
    imp::requested()
}

impl Replying {
    /// Starts a reply: clears an earlier request.
    pub fn start() -> Self {
        imp::set_replying(true);
        Replying(())
    }
}

impl Drop for Replying {
    fn drop(&mut self) {
        imp::set_replying(false);
    }
}
