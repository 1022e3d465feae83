//! MultiGPS key placement across global servers.
