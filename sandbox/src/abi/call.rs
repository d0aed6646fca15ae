//! The ABI v1 calling convention (DESIGN §2): what a module must export
//! (checked before it is ever instantiated) and how the host calls an
//! instance — the version handshake, `_initialize`/`sandgate_init`, and one
//! evaluation (input written through `sandgate_alloc`, the packed result of
//! `sandgate_evaluate` unpacked and read back). `policy` orchestrates these.

use wasmtime::{AsContextMut, ExternType, Instance, Module, ValType};

use super::memory::{AbiViolation, checked_range};
use super::{ABI_VERSION, IMPORTS, MODULE, WASI_MODULE};
use crate::decision::Decision;

/// The optional export run once at load (DESIGN §2).
pub const INIT_EXPORT: &str = "sandgate_init";
/// The reactor initialiser of wasi-libc, run before `sandgate_init`.
pub const INITIALIZE_EXPORT: &str = "_initialize";

/// Checks a module against ABI v1 before it is ever instantiated: required
/// exports with their exact types, and imports only from `sandgate` (known
/// names) and `wasi_snapshot_preview1`. The error names what is wrong.
pub fn validate(module: &Module) -> Result<(), String> {
    use ValType::{I32, I64};
    let func = |name: &str, params: &[ValType], results: &[ValType]| -> Result<(), String> {
        let signature = |ps: &[ValType], rs: &[ValType]| {
            let list = |ts: &[ValType]| {
                ts.iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!("({}) -> ({})", list(ps), list(rs))
        };
        let wanted = signature(params, results);
        match module.get_export(name) {
            None => Err(format!("missing required export `{name}` {wanted}")),
            Some(ExternType::Func(ty)) => {
                let have = signature(
                    &ty.params().collect::<Vec<_>>(),
                    &ty.results().collect::<Vec<_>>(),
                );
                if have == wanted {
                    Ok(())
                } else {
                    Err(format!(
                        "export `{name}` has type {have}, expected {wanted}"
                    ))
                }
            }
            Some(_) => Err(format!("export `{name}` must be a function {wanted}")),
        }
    };
    match module.get_export("memory") {
        Some(ExternType::Memory(m)) if !m.is_64() => {}
        Some(ExternType::Memory(_)) => return Err("export `memory` must be a 32-bit memory".into()),
        Some(_) => return Err("export `memory` must be a memory".into()),
        None => return Err("missing required export `memory`".into()),
    }
    func("sandgate_abi_version", &[], &[I32])?;
    func("sandgate_alloc", &[I32], &[I32])?;
    func("sandgate_evaluate", &[I32, I32], &[I64])?;
    if module.get_export(INITIALIZE_EXPORT).is_some() {
        func(INITIALIZE_EXPORT, &[], &[])?;
    }
    if module.get_export(INIT_EXPORT).is_some() {
        func(INIT_EXPORT, &[], &[I32])?;
    }
    for import in module.imports() {
        match import.module() {
            MODULE if IMPORTS.contains(&import.name()) => {}
            MODULE => {
                return Err(format!(
                    "imports `{MODULE}::{}`, which ABI v1 does not provide (it has {})",
                    import.name(),
                    IMPORTS.join(", ")
                ));
            }
            WASI_MODULE => {}
            // The test-only escape drill (`host::escape`); never in a
            // release build.
            #[cfg(feature = "escape-drill")]
            "sandgate_escape_drill" => {}
            other => {
                return Err(format!(
                    "imports `{other}::{}`: only `{MODULE}` and `{}` imports are allowed",
                    import.name(),
                    WASI_MODULE
                ));
            }
        }
    }
    Ok(())
}

/// Asks a fresh instance which ABI it speaks; anything but `ABI_VERSION` is refused.
pub async fn check_version<T: Send + 'static>(
    mut store: impl AsContextMut<Data = T>,
    instance: Instance,
) -> Result<(), String> {
    let version = instance
        .get_typed_func::<(), i32>(&mut store, "sandgate_abi_version")
        .map_err(|e| format!("{e:#}"))?
        .call_async(&mut store, ())
        .await
        .map_err(|e| format!("sandgate_abi_version trapped: {e:#}"))?;
    if version != ABI_VERSION {
        return Err(format!(
            "sandgate_abi_version returned {version}; this host speaks ABI version {ABI_VERSION}"
        ));
    }
    Ok(())
}

/// Runs `_initialize` if the instance exports it.
pub async fn initialize<T: Send + 'static>(
    mut store: impl AsContextMut<Data = T>,
    instance: Instance,
) -> wasmtime::Result<()> {
    if let Ok(initialize) = instance.get_typed_func::<(), ()>(&mut store, INITIALIZE_EXPORT) {
        initialize.call_async(&mut store, ()).await?;
    }
    Ok(())
}

/// Runs `sandgate_init` and returns its status (0 is success).
pub async fn init<T: Send + 'static>(
    mut store: impl AsContextMut<Data = T>,
    instance: Instance,
) -> wasmtime::Result<i32> {
    instance
        .get_typed_func::<(), i32>(&mut store, INIT_EXPORT)?
        .call_async(&mut store, ())
        .await
}

/// One evaluation: `document` (the input JSON) is written into memory the
/// guest allocates, `sandgate_evaluate` runs, and the decision it returns
/// (at most `max_output` bytes) is read back and parsed.
pub async fn evaluate<T: Send + 'static>(
    mut store: impl AsContextMut<Data = T>,
    instance: Instance,
    document: &[u8],
    max_output: u64,
) -> anyhow::Result<Decision> {
    let alloc = instance.get_typed_func::<i32, i32>(&mut store, "sandgate_alloc")?;
    let evaluate = instance.get_typed_func::<(i32, i32), i64>(&mut store, "sandgate_evaluate")?;
    let memory = instance
        .get_memory(&mut store, "memory")
        .ok_or_else(|| AbiViolation("module exports no memory".into()))?;

    let len = i32::try_from(document.len()).map_err(|_| {
        AbiViolation(format!(
            "input of {} bytes does not fit a guest",
            document.len()
        ))
    })?;
    let ptr = alloc.call_async(&mut store, len).await?;
    if ptr == 0 {
        return Err(AbiViolation(format!("sandgate_alloc returned 0 for {len} bytes")).into());
    }
    let data = memory.data_mut(&mut store);
    let range = checked_range(data.len(), ptr as u32, len as u32)
        .map_err(|e| AbiViolation(format!("sandgate_alloc returned an unusable pointer: {e}")))?;
    data[range].copy_from_slice(document);

    let (out_ptr, out_len) = unpack(evaluate.call_async(&mut store, (ptr, len)).await?);
    if u64::from(out_len) > max_output {
        return Err(AbiViolation(format!(
            "decision is {out_len} bytes; the maximum output is {max_output} bytes"
        ))
        .into());
    }
    let data = memory.data(&store);
    let range = checked_range(data.len(), out_ptr, out_len).map_err(|e| {
        AbiViolation(format!(
            "sandgate_evaluate returned a bad decision pointer: {e}"
        ))
    })?;
    Decision::from_guest(&data[range]).map_err(|m| AbiViolation(m).into())
}

/// Splits the packed `(out_ptr << 32) | out_len` result of `sandgate_evaluate`.
pub fn unpack(packed: i64) -> (u32, u32) {
    let bits = packed as u64;
    ((bits >> 32) as u32, bits as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_results_split_into_pointer_and_length() {
        assert_eq!(unpack((1024_i64 << 32) | 77), (1024, 77));
        assert_eq!(unpack(-1), (u32::MAX, u32::MAX));
    }
}
