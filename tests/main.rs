mod common;
mod fault;
mod hostile;
mod lifecycle;
mod reliability;
mod secrets;
mod stop;
