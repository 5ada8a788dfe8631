//! The controller of qubes-ctl as a library: the binary only parses arguments and calls
//! [`cli::main_with`].

pub mod api;
pub mod catalogue;
pub mod cli;
pub mod console;
pub mod controller;
pub mod daemon;
pub mod generate;
pub mod guest_tools;
pub mod logging;
pub mod notify;
pub mod paths;
pub mod repo;
pub mod results;
pub mod run;
pub mod units;
pub mod xen_agent;
pub mod xen_disks;
