//! drctl: the operator's command line against the process server's admin API.
