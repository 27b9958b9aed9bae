//! The PostgreSQL backend (SPEC §12). Not built yet.

use anyhow::Result;

use super::{Reader, Writer};

/// An open PostgreSQL database.
pub enum PgStore {}

impl PgStore {
    pub fn read<T>(&self, _f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        match *self {}
    }
    pub fn read_snapshot<T>(&self, _f: impl FnOnce(&Reader) -> Result<T>) -> Result<T> {
        match *self {}
    }
    pub fn write<T>(&self, _f: impl FnMut(&Writer) -> Result<T>) -> Result<T> {
        match *self {}
    }
    pub fn write_rolled_back<T>(&self, _f: impl FnOnce(&Writer) -> Result<T>) -> Result<T> {
        match *self {}
    }
    pub fn settle_waits(&self) -> Result<usize> {
        match *self {}
    }
    pub fn created(&self) -> bool {
        match *self {}
    }
    pub fn opened_version(&self) -> i64 {
        match *self {}
    }
    pub fn schema_version(&self) -> Result<i64> {
        match *self {}
    }
    pub fn describe(&self) -> String {
        match *self {}
    }
}
