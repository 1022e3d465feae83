//! geomx-net: zero-copy transport for geo-distributed parameter servers.
