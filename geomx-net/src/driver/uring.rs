pub(crate) fn probe() -> Option<String> {
    Some("io_uring driver not built yet".into())
}
pub(crate) struct UringDriver;
impl UringDriver {
    pub(crate) fn start(_o: &super::NetOptions) -> Result<std::sync::Arc<Self>, crate::NetError> {
        Err(crate::NetError::DriverUnavailable("x".into()))
    }
    pub(crate) fn attach(
        &self,
        _s: std::net::TcpStream,
        _c: crate::conn::Connection<crate::link::ReplyTx>,
        _k: std::sync::Arc<crate::stats::LiveCounters>,
        _d: std::sync::Arc<dyn crate::link::Dispatch>,
    ) -> Result<std::sync::Arc<crate::link::Link>, crate::NetError> {
        Err(crate::NetError::DriverUnavailable("x".into()))
    }
    pub(crate) fn shutdown(&self) {}
}
