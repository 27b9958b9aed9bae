mod common;
mod lifecycle;
mod stop;
mod wal;
