//! [`Store`] over Envoy's shared data.

use super::abi;
use crate::store::{Store, StoreError, Versioned};
use std::num::NonZeroU32;

/// The shared data of this VM's `vm_id`.
pub struct SharedData;

impl Store for SharedData {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        match abi::get_shared_data(key) {
            Ok(Some((bytes, version))) => {
                Ok(NonZeroU32::new(version).map(|version| Versioned { bytes, version }))
            }
            Ok(None) => Ok(None),
            Err(abi::Status(status)) => Err(StoreError::Host(status)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<NonZeroU32>) -> Result<(), StoreError> {
        match abi::set_shared_data(key, value, cas.map_or(0, NonZeroU32::get)) {
            Ok(()) => Ok(()),
            Err(abi::CAS_MISMATCH) => Err(StoreError::CasMismatch),
            Err(abi::Status(status)) => Err(StoreError::Host(status)),
        }
    }
}
