//! `[ebpf] enforce`: the BPF LSM programs' side in the daemon. Loading and
//! attaching them ([`attach`]), each policy's grants as the programs see
//! them ([`Confinement`]: its preopens by device and inode in `FILES`, the
//! addresses its egress resolved to in `ADDRESSES`), the refusals they
//! describe in a thread's slot ([`Refusal`], folded into the invocation's
//! account like the tallies, and reported as `kernel_denied`), and the
//! start-up drill ([`drill`]) that proves the refusals work on this kernel.
//!
//! A policy's grants get an index in the maps the first time it is watched,
//! and give it back when the policy version is dropped (a reload). Nothing
//! is written per decision except, for a policy with egress, each new
//! address its egress resolves to, once.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Mutex, OnceLock, PoisonError},
};

use aya::{
    Btf as AyaBtf, Ebpf,
    maps::{HashMap as BpfHashMap, MapData},
    programs::Lsm as LsmProgram,
};
use sandgate_probes_common::{
    AddressKey, DENIAL_NAME, Denial, FileKey, MAX_GRANTS, NO_GRANTS, access, names, operation,
};

use super::ATTACHED;
use super::slots;
use crate::config::{Access, EgressSettings, Grants};
use crate::fetch::error_chain;

/// The attached LSM programs' maps and the free grants indexes.
pub(super) struct Lsm {
    files: Mutex<BpfHashMap<MapData, FileKey, u32>>,
    addresses: Mutex<BpfHashMap<MapData, AddressKey, u32>>,
    free: Mutex<Vec<u32>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Loads and attaches the LSM programs of `ebpf`; the error is the precise
/// reason they cannot enforce here.
pub(super) fn attach(ebpf: &mut Ebpf) -> Result<Lsm, String> {
    if let Some(missing) = missing_mac_admin() {
        return Err(missing);
    }
    if let Some(inactive) = lsm_inactive() {
        return Err(inactive);
    }
    let btf = AyaBtf::from_sys_fs().map_err(|e| {
        format!(
            "BTF missing: cannot read the kernel's BTF ({})",
            error_chain(&e)
        )
    })?;
    for hook in names::LSM {
        let program: &mut LsmProgram = ebpf
            .program_mut(hook)
            .ok_or_else(|| format!("program {hook} is missing from the eBPF object"))?
            .try_into()
            .map_err(|e| format!("program {hook}: {}", error_chain(&e)))?;
        program.load(hook, &btf).map_err(|e| {
            let chain = error_chain(&e);
            if chain.contains("Operation not permitted") {
                // The capabilities were checked above: something else says no.
                format!(
                    "the kernel refused to load BPF LSM program {hook} (EPERM) although this \
                     process has the capabilities it needs: a security policy on \
                     this machine (another LSM, or a BPF LSM program of its own) forbids loading \
                     BTF-attached programs ({chain})"
                )
            } else {
                format!("loading LSM program {hook}: {chain}")
            }
        })?;
        program
            .attach()
            .map_err(|e| format!("attaching LSM program {hook}: {}", error_chain(&e)))?;
    }
    fn take<K: aya::Pod>(
        ebpf: &mut Ebpf,
        name: &str,
    ) -> Result<BpfHashMap<MapData, K, u32>, String> {
        let map = ebpf
            .take_map(name)
            .ok_or_else(|| format!("map {name} is missing from the eBPF object"))?;
        BpfHashMap::try_from(map).map_err(|e| format!("map {name}: {}", error_chain(&e)))
    }
    Ok(Lsm {
        files: Mutex::new(take(ebpf, names::FILES)?),
        addresses: Mutex::new(take(ebpf, names::ADDRESSES)?),
        free: Mutex::new((0..MAX_GRANTS).rev().collect()),
    })
}

/// Why this process may not attach BPF LSM programs: the kernel wants
/// CAP_MAC_ADMIN for them, besides what the probes need.
fn missing_mac_admin() -> Option<String> {
    const CAP_MAC_ADMIN: u32 = 33;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())?;
    (effective & (1 << CAP_MAC_ADMIN) == 0).then(|| {
        format!(
            "missing capability CAP_MAC_ADMIN (BPF LSM programs need it): effective \
             capabilities are {effective:#x}"
        )
    })
}

/// Why the BPF LSM is not active, when securityfs says so. When securityfs
/// is not mounted this cannot be told here, and the drill finds out.
fn lsm_inactive() -> Option<String> {
    let active = std::fs::read_to_string("/sys/kernel/security/lsm").ok()?;
    (!active.trim().split(',').any(|lsm| lsm == "bpf")).then(|| {
        format!(
            "LSM not active: the kernel's active LSMs are `{}`, without bpf (boot with \
             lsm=…,bpf)",
            active.trim()
        )
    })
}

/// The kernel's encoding of a device number, from the one `stat` gives.
fn kernel_dev(dev: u64) -> u32 {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    ((major << 20) | (minor & 0xf_ffff)) as u32
}

/// One policy version's grants as the LSM programs see them.
pub struct Confinement {
    preopens: Vec<(PathBuf, Access)>,
    /// Its index in `FILES` and `ADDRESSES`, once registered.
    index: OnceLock<u32>,
    /// What was written for it, to remove when it is dropped.
    files: Mutex<Vec<FileKey>>,
    addresses: Mutex<HashSet<SocketAddr>>,
}

impl std::fmt::Debug for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confinement")
            .field("preopens", &self.preopens)
            .field("index", &self.index.get())
            .finish()
    }
}

impl Confinement {
    /// A policy's: its preopens (by what their host paths are when it is
    /// first watched); its egress is recorded as the bridge resolves it.
    pub fn for_policy(grants: &Grants, _egress: &EgressSettings) -> Confinement {
        Confinement {
            preopens: grants
                .preopens
                .iter()
                .map(|p| (p.host.clone(), p.access))
                .collect(),
            index: OnceLock::new(),
            files: Mutex::new(Vec::new()),
            addresses: Mutex::new(HashSet::new()),
        }
    }

    /// Grants nothing: the drill's.
    pub fn nothing() -> Confinement {
        Confinement::for_policy(&Grants::default(), &EgressSettings::default())
    }

    /// The index the programs know these grants by, registering them the
    /// first time; [`NO_GRANTS`] (everything refused) when enforcement is
    /// off or the table is full.
    pub(super) fn index(&self) -> u32 {
        let Some(lsm) = ATTACHED.get().and_then(|s| s.lsm.as_ref()) else {
            return NO_GRANTS;
        };
        *self.index.get_or_init(|| self.register(lsm))
    }

    fn register(&self, lsm: &Lsm) -> u32 {
        let Some(index) = lock(&lsm.free).pop() else {
            tracing::warn!(
                "the kernel's table of policy grants is full ({MAX_GRANTS}): a policy's \
                 invocations are refused every file and connect until one is unloaded"
            );
            return NO_GRANTS;
        };
        let mut written = lock(&self.files);
        let mut files = lock(&lsm.files);
        for (path, mode) in &self.preopens {
            let meta = match std::fs::metadata(path) {
                Ok(meta) => meta,
                Err(e) => {
                    tracing::warn!(
                        preopen = ?path,
                        "a preopened directory cannot be read for BPF LSM enforcement; \
                         opens beneath it are refused: {e}"
                    );
                    continue;
                }
            };
            let key = FileKey {
                grants: index,
                dev: kernel_dev(meta.dev()),
                ino: meta.ino(),
            };
            let granted = match mode {
                Access::ReadOnly => access::READ,
                Access::ReadWrite => access::READ | access::WRITE,
            };
            match files.insert(key, granted, 0) {
                Ok(()) => written.push(key),
                Err(e) => tracing::warn!(
                    preopen = ?path,
                    "a preopened directory cannot be granted to BPF LSM enforcement; opens \
                     beneath it are refused: {}",
                    error_chain(&e)
                ),
            }
        }
        index
    }

    /// Lets this policy's invocations connect to `addrs`, which its egress
    /// resolved to (the bridge calls this before connecting).
    pub fn permit_connect(&self, addrs: &[SocketAddr]) {
        let Some(lsm) = ATTACHED.get().and_then(|s| s.lsm.as_ref()) else {
            return;
        };
        let index = self.index();
        if index == NO_GRANTS {
            return;
        }
        let mut known = lock(&self.addresses);
        for addr in addrs {
            if known.contains(addr) {
                continue;
            }
            let key = address_key(index, addr);
            // The daemon's own bookkeeping, not the guest's: made outside
            // the invocation, so the `bpf` hook lets it through.
            let inserted = slots::outside(|| lock(&lsm.addresses).insert(key, 1u32, 0));
            match inserted {
                Ok(()) => {
                    known.insert(*addr);
                }
                Err(e) => tracing::warn!(
                    %addr,
                    "an egress address cannot be granted to BPF LSM enforcement; connects \
                     to it are refused: {}",
                    error_chain(&e)
                ),
            }
        }
    }
}

fn address_key(grants: u32, addr: &SocketAddr) -> AddressKey {
    let (family, bytes) = match addr.ip() {
        IpAddr::V4(ip) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&ip.octets());
            (2, bytes)
        }
        IpAddr::V6(ip) => (10, ip.octets()),
    };
    AddressKey {
        grants,
        family,
        port: addr.port().to_be(),
        addr: address_words(bytes),
    }
}

/// An address's 16 bytes (IPv4 in the first 4) as the programs read them.
fn address_words(bytes: [u8; 16]) -> [u64; 2] {
    let word = |half: &[u8]| u64::from_ne_bytes(half.try_into().unwrap_or_default());
    [word(&bytes[..8]), word(&bytes[8..])]
}

/// The 16 bytes of an address the programs read as two words.
fn address_bytes(words: [u64; 2]) -> [u8; 16] {
    let mut bytes = [0; 16];
    bytes[..8].copy_from_slice(&words[0].to_ne_bytes());
    bytes[8..].copy_from_slice(&words[1].to_ne_bytes());
    bytes
}

impl Drop for Confinement {
    fn drop(&mut self) {
        let Some(&index) = self.index.get() else {
            return;
        };
        let Some(lsm) = ATTACHED.get().and_then(|s| s.lsm.as_ref()) else {
            return;
        };
        if index == NO_GRANTS {
            return;
        }
        let files = std::mem::take(&mut *lock(&self.files));
        let addresses = std::mem::take(&mut *lock(&self.addresses));
        slots::outside(|| {
            let mut map = lock(&lsm.files);
            for key in &files {
                let _ = map.remove(key);
            }
            let mut map = lock(&lsm.addresses);
            for addr in &addresses {
                let _ = map.remove(&address_key(index, addr));
            }
        });
        lock(&lsm.free).push(index);
    }
}

/// One refusal, as reported: the `kernel_denied` audit line's fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) operation: &'static str,
    pub(super) detail: String,
}

impl Refusal {
    pub(super) fn from_denial(denial: &Denial) -> Refusal {
        let name = {
            let end = denial
                .name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(DENIAL_NAME);
            String::from_utf8_lossy(&denial.name[..end]).into_owned()
        };
        let detail = match denial.operation {
            operation::FILE_OPEN => format!(
                "{name} (device {}:{}, inode {}, {})",
                denial.dev >> 20,
                denial.dev & 0xf_ffff,
                denial.ino,
                if denial.write != 0 {
                    "for writing"
                } else {
                    "for reading"
                }
            ),
            operation::SOCKET_CONNECT => {
                let port = u16::from_be(denial.port);
                let bytes = address_bytes(denial.addr);
                match denial.family {
                    2 => {
                        let ip: [u8; 4] = bytes[..4].try_into().unwrap_or_default();
                        SocketAddr::from((ip, port)).to_string()
                    }
                    10 => SocketAddr::from((bytes, port)).to_string(),
                    1 => "a unix socket (family AF_UNIX)".to_owned(),
                    family => format!("address family {family}"),
                }
            }
            operation::EXEC => name,
            _ => String::new(),
        };
        Refusal {
            operation: operation::name(denial.operation),
            detail,
        }
    }

    /// For refusals counted in a slot but not described (more than
    /// `MAX_DENIALS` in one poll).
    pub(super) fn undescribed(count: u64) -> Refusal {
        Refusal {
            operation: "unknown",
            detail: format!("{count} more refusals in one poll, not described"),
        }
    }
}

/// The start-up drill: an invocation of `sandgate:selftest`, granted
/// nothing, tries to open the daemon's own executable and to connect to a
/// listener of its own, on a thread of its own; both must fail with EPERM
/// and be reported as `kernel_denied`. Returns why it failed, if it did.
pub(super) fn drill(audit: &crate::audit::AuditLog) -> Result<(), String> {
    let audit = audit.clone();
    std::thread::Builder::new()
        .name("sandgate-selftest".into())
        .spawn(move || drill_here(audit))
        .map_err(|e| format!("cannot start the drill's thread: {e}"))?
        .join()
        .map_err(|_| "the drill's thread panicked".to_owned())?
}

fn drill_here(audit: crate::audit::AuditLog) -> Result<(), String> {
    use std::sync::Arc;

    use super::{Expected, Watch};
    use crate::audit::Subject;
    use crate::config::Digest;

    let exe = std::env::current_exe()
        .map_err(|e| format!("cannot find the daemon's executable to open: {e}"))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot bind the drill's listener: {e}"))?;
    let target = listener
        .local_addr()
        .map_err(|e| format!("the drill's listener has no address: {e}"))?;
    let confinement = Arc::new(Confinement::nothing());
    let digest = Digest::of(b"sandgate:selftest").to_string();
    let probe = super::watch(|| Watch {
        subject: Subject::new(
            "sandgate:selftest",
            env!("CARGO_PKG_VERSION"),
            &digest,
            "selftest".into(),
        ),
        audit,
        trace: crate::telemetry::traces::Scope::default(),
        expected: Arc::new(Expected::for_policy(
            &Grants::default(),
            &EgressSettings::default(),
        )),
        confinement: Arc::clone(&confinement),
        deadline: std::time::Duration::from_secs(5),
    });
    if !probe.is_watched() {
        return Err("the probes are not attached".into());
    }
    let (open, connect) = probe.stretch(|| {
        let open = std::fs::File::open(&exe).map(drop);
        let connect =
            std::net::TcpStream::connect_timeout(&target, std::time::Duration::from_secs(2))
                .map(drop);
        (open, connect)
    });
    let denied = probe.denied_count();
    super::end(probe);
    let verdict = |what: &str, result: std::io::Result<()>| match result {
        Err(e) if e.raw_os_error() == Some(1) => Ok(()),
        Err(e) => Err(format!(
            "the {what} failed, but not with EPERM from the kernel: {e}"
        )),
        Ok(()) => Err(format!(
            "the kernel let the {what} through (is bpf among the active LSMs? see \
             /sys/kernel/security/lsm; boot with lsm=…,bpf)"
        )),
    };
    verdict(&format!("open of {}", exe.display()), open)?;
    verdict(&format!("connect to {target}"), connect)?;
    if denied < 2 {
        return Err(format!(
            "the kernel refused both, but described {denied} refusals instead of 2"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_are_converted_to_the_kernels_encoding() {
        // 8:1 as glibc encodes it, and a large minor.
        assert_eq!(kernel_dev(0x801), (8 << 20) | 1);
        let dev = (259u64 << 8) | (0x12345 & 0xff) | ((0x12345u64 & !0xff) << 12);
        assert_eq!(kernel_dev(dev), (259 << 20) | 0x12345);
    }

    #[test]
    fn refusals_read_as_operation_and_detail() {
        let mut denial = Denial {
            operation: operation::SOCKET_CONNECT,
            family: 2,
            port: 9u16.to_be(),
            ..Denial::default()
        };
        let mut bytes = [0; 16];
        bytes[..4].copy_from_slice(&[127, 0, 0, 1]);
        denial.addr = address_words(bytes);
        let refusal = Refusal::from_denial(&denial);
        assert_eq!(refusal.operation, "socket_connect");
        assert_eq!(refusal.detail, "127.0.0.1:9");

        let mut denial = Denial {
            operation: operation::FILE_OPEN,
            dev: (8 << 20) | 1,
            ino: 42,
            ..Denial::default()
        };
        denial.name[..6].copy_from_slice(b"shadow");
        let refusal = Refusal::from_denial(&denial);
        assert_eq!(refusal.operation, "file_open");
        assert_eq!(refusal.detail, "shadow (device 8:1, inode 42, for reading)");
    }
}
