mod common;
mod stop;
mod queue;
