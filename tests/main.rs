mod common;
mod lifecycle;
mod plans;
mod stop;
mod wal;
