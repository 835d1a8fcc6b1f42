//! [`Store`] over Envoy's shared data.

use crate::store::{Store, StoreError, Versioned};
use proxy_wasm::hostcalls;
use proxy_wasm::types::Status;
use std::num::NonZeroU32;

/// The shared data of this VM's `vm_id`.
pub struct SharedData;

impl Store for SharedData {
    fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), Some(version))) => {
                Ok(NonZeroU32::new(version).map(|version| Versioned { bytes, version }))
            }
            Ok(_) => Ok(None),
            Err(status) => Err(StoreError::Host(status as u32)),
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<NonZeroU32>) -> Result<(), StoreError> {
        match hostcalls::set_shared_data(key, Some(value), cas.map(NonZeroU32::get)) {
            Ok(()) => Ok(()),
            Err(Status::CasMismatch) => Err(StoreError::CasMismatch),
            Err(status) => Err(StoreError::Host(status as u32)),
        }
    }
}
