mod cli;
mod common;
mod docs;
mod event;
mod lifecycle;
mod queue;
mod stop;
