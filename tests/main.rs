mod cli;
mod common;
mod docs;
mod event;
mod event_hostile;
mod lifecycle;
mod queue;
mod stop;
