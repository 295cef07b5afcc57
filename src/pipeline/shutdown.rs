//! How a run is asked to stop: the first request drains committed work and confirms it, a
//! second one stops at once (nothing is lost either way: unconfirmed work is redelivered).

use tokio::sync::watch;

#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<u32>,
}

#[derive(Clone)]
pub struct ShutdownHandle {
    tx: std::sync::Arc<watch::Sender<u32>>,
}

impl ShutdownHandle {
    pub fn request(&self) {
        self.tx.send_modify(|n| *n += 1);
    }
}

pub fn shutdown_channel() -> (ShutdownHandle, Shutdown) {
    let (tx, rx) = watch::channel(0);
    (
        ShutdownHandle {
            tx: std::sync::Arc::new(tx),
        },
        Shutdown { rx },
    )
}

impl Shutdown {
    pub(crate) fn requests(&self) -> u32 {
        *self.rx.borrow()
    }

    /// Resolves once at least `n` requests were made (or every handle is gone).
    pub(crate) async fn at_least(&mut self, n: u32) {
        let _ = self.rx.wait_for(|count| *count >= n).await;
    }
}
