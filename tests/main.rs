mod common;
mod stop;
