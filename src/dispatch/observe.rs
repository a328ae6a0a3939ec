//! What the admin's panel sees of the sessions beyond the API's view: the screen of a
//! session's VM, what each VM costs (CPU time, memory), and the sessions that failed.

use super::backend::{Screen, VmUsage};
use super::{Backend, Dispatcher, Error, SessionInfo};

impl<B: Backend> Dispatcher<B> {
    /// Failed sessions still kept (see [`super::FAILED_KEPT`]), with their error.
    pub async fn failed_sessions(&self) -> Vec<SessionInfo> {
        let st = self.state.lock().await;
        st.failed.values().map(|f| f.info.clone()).collect()
    }

    /// The screen of session `id`'s VM; for the admin only (the panel asks behind its
    /// login), so no seat's key is checked here.
    pub async fn screenshot(&self, id: &str) -> Result<Screen, Error> {
        let control = {
            let st = self.state.lock().await;
            let s = st
                .sessions
                .get(id)
                .ok_or_else(|| Error::NotFound(id.to_string()))?;
            self.backend.control(&s.vm)
        };
        self.backend.screenshot(control).await
    }

    /// CPU time and memory of every running session's VM.
    pub async fn vm_usage(&self) -> Vec<(String, VmUsage)> {
        let st = self.state.lock().await;
        st.sessions
            .iter()
            .filter_map(|(id, s)| Some((id.clone(), self.backend.usage(&s.vm)?)))
            .collect()
    }
}
