//! The HiPS roles: coordinator, global server, local server and worker.
