mod common;
mod stop;
mod queue;
mod cli;
mod docs;
