//! Guest memory: the only code that turns guest `(ptr, len)` pairs into
//! bytes, every access bounds-checked against the guest's exported memory.
//! A leaf (it imports nothing of this crate): host functions of `wasi`,
//! `bridge` and `abi` call it with their `Caller`, whatever its store type.

use std::ops::Range;

use wasmtime::{Caller, Extern, Memory};

/// A guest broke the ABI: a bad pointer, length or output.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AbiViolation(pub String);

/// The byte range `[ptr, ptr+len)` if it lies inside memory of `size` bytes.
pub fn checked_range(size: usize, ptr: u32, len: u32) -> Result<Range<usize>, AbiViolation> {
    let start = ptr as usize;
    let end = start.checked_add(len as usize);
    match end {
        Some(end) if end <= size => Ok(start..end),
        _ => Err(AbiViolation(format!(
            "range [{ptr}, {ptr}+{len}) is outside guest memory of {size} bytes"
        ))),
    }
}

/// The guest's exported memory, seen from a host function.
pub fn memory<T>(caller: &mut Caller<'_, T>) -> Option<Memory> {
    caller.get_export("memory").and_then(Extern::into_memory)
}

fn exported<T>(caller: &mut Caller<'_, T>) -> Result<Memory, AbiViolation> {
    memory(caller).ok_or_else(|| AbiViolation("module exports no memory".into()))
}

/// Copies `len` bytes at `ptr` out of guest memory.
pub fn read_guest<T>(
    caller: &mut Caller<'_, T>,
    ptr: i32,
    len: usize,
) -> Result<Vec<u8>, AbiViolation> {
    let memory = exported(caller)?;
    let data = memory.data(&caller);
    let len = u32::try_from(len).map_err(|_| AbiViolation(format!("length {len} is too large")))?;
    let range = checked_range(data.len(), ptr as u32, len)?;
    Ok(data[range].to_vec())
}

/// Reads a UTF-8 string (lossily) of at most `max` bytes; longer ones are cut.
pub fn read_guest_string<T>(
    caller: &mut Caller<'_, T>,
    ptr: i32,
    len: i32,
    max: usize,
) -> Result<String, AbiViolation> {
    let len = u32::try_from(len).map_err(|_| AbiViolation(format!("negative length {len}")))?;
    let memory = exported(caller)?;
    let data = memory.data(&caller);
    let range = checked_range(data.len(), ptr as u32, len)?;
    let bytes = &data[range];
    let cut = bytes.len().min(max);
    let mut text = String::from_utf8_lossy(&bytes[..cut]).into_owned();
    if cut < bytes.len() {
        text.push('…');
    }
    Ok(text)
}

/// Writes `bytes` at `ptr` in guest memory.
pub fn write_guest<T>(
    caller: &mut Caller<'_, T>,
    ptr: i32,
    bytes: &[u8],
) -> Result<(), AbiViolation> {
    let memory = exported(caller)?;
    let data = memory.data_mut(caller);
    let range = checked_range(data.len(), ptr as u32, bytes.len() as u32)?;
    data[range].copy_from_slice(bytes);
    Ok(())
}

/// Concatenates the buffers of a WASI iovec array, keeping at most `max` bytes.
pub fn gather_iovecs<T>(
    caller: &mut Caller<'_, T>,
    iovs: i32,
    count: i32,
    max: usize,
) -> Result<Vec<u8>, AbiViolation> {
    let memory = exported(caller)?;
    let data = memory.data(&caller);
    let count =
        u32::try_from(count).map_err(|_| AbiViolation(format!("negative iovec count {count}")))?;
    let table = checked_range(data.len(), iovs as u32, count.saturating_mul(8))?;
    let mut out = Vec::new();
    for entry in data[table].chunks_exact(8) {
        let ptr = u32::from_le_bytes([entry[0], entry[1], entry[2], entry[3]]);
        let len = u32::from_le_bytes([entry[4], entry[5], entry[6], entry[7]]);
        let range = checked_range(data.len(), ptr, len)?;
        let room = max.saturating_sub(out.len());
        out.extend_from_slice(&data[range][..room.min(len as usize)]);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_against_memory_size() {
        assert_eq!(checked_range(100, 10, 20).ok(), Some(10..30));
        assert_eq!(checked_range(100, 0, 100).ok(), Some(0..100));
        assert!(checked_range(100, 90, 11).is_err());
        assert!(checked_range(100, u32::MAX, 2).is_err());
        assert!(checked_range(0, 0, 1).is_err());
    }
}
