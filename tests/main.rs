mod common;
mod event;
mod lifecycle;
mod stop;
