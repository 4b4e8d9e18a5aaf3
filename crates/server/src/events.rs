//! Live events for watchers (SSE): state changes and progress samples, fanned out in memory.
//! The store is the record; this is only the live view of it.

use ferry_api::migrations::Event;
use tokio::sync::broadcast;

/// The server's event bus. Slow watchers lose old events rather than slowing migrations.
#[derive(Debug, Clone)]
pub struct EventBus(broadcast::Sender<Event>);

impl Default for EventBus {
    fn default() -> Self {
        EventBus(broadcast::channel(1024).0)
    }
}

impl EventBus {
    pub fn publish(&self, event: Event) {
        let _ = self.0.send(event);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.0.subscribe()
    }
}
