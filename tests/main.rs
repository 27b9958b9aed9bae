mod common;
mod event;
mod stop;
