//! The local launcher: a whole multi-data-center cluster as processes on one machine.
