mod common;
mod fault;
mod lifecycle;
mod reliability;
mod stop;
