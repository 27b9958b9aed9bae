mod common;
mod lifecycle;
mod stop;
