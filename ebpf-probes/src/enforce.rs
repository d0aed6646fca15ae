//! The BPF LSM programs of `[ebpf] enforce`: for a daemon thread inside a
//! stretch of a guest invocation (its slot names the invocation), refuse
//! with EPERM what the policy's grants do not explain, and describe the
//! refusal in the thread's slot, where the daemon folds it into the
//! invocation's account at the end of the poll (as it does the tallies).
//!
//! - `file_open`: allowed when the file, or one of the directories above it
//!   (at most `MAX_DEPTH`), is a preopen of the policy (`FILES`, keyed by
//!   grants index, device and inode) whose access covers the open (a file
//!   opened for writing needs a read-write preopen).
//! - `socket_connect`: allowed to an IPv4/IPv6 address and port the
//!   policy's egress resolved to (`ADDRESSES`, filled by the bridge before
//!   it connects); any other family is refused.
//! - `bprm_check_security` (exec), `ptrace_access_check`, `sb_mount`, `bpf`:
//!   always refused.
//!
//! Every other thread and process returns after the slot lookup the
//! tracepoints make too. Kernel structures are read with
//! `bpf_probe_read_kernel` at offsets the loader found in the running
//! kernel's BTF (`OFFSETS`); a read that fails refuses.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_str_bytes},
    macros::{lsm, map},
    maps::HashMap,
    programs::LsmContext,
};
use sandgate_probes_common::{
    AddressKey, Denial, FileKey, MAX_ADDRESSES, MAX_DEPTH, MAX_FILES, NO_GRANTS, Offsets, Slot,
    access, operation,
};

use crate::programs::slot;

/// Where the fields the programs read are in this kernel; set by the loader.
#[unsafe(no_mangle)]
static OFFSETS: Offsets = Offsets {
    file_f_path_dentry: 0,
    file_f_inode: 0,
    file_f_mode: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    super_block_s_dev: 0,
    dentry_d_parent: 0,
    dentry_d_inode: 0,
    dentry_d_name_name: 0,
    linux_binprm_filename: 0,
};

/// (grants, device, inode) of each preopened directory (or file) → access.
#[map]
static FILES: HashMap<FileKey, u32> = HashMap::with_max_entries(MAX_FILES, 0);

/// (grants, family, port, address) each policy's egress resolved to.
#[map]
static ADDRESSES: HashMap<AddressKey, u32> = HashMap::with_max_entries(MAX_ADDRESSES, 0);

const EPERM: i32 = 1;
const FMODE_WRITE: u32 = 0x2;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[inline(always)]
fn offsets() -> Offsets {
    // SAFETY: a plain read of a global the loader sets before loading.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// Reads a `T` at `base + offset` in kernel memory.
#[inline(always)]
unsafe fn read<T>(base: *const u8, offset: u32) -> Option<T> {
    // SAFETY: the helper checks the address; a bad one is an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()).ok() }
}

/// The slot of the calling thread when it is inside an invocation.
#[inline(always)]
fn inside() -> Option<*mut Slot> {
    let (_, slot) = slot()?;
    // SAFETY: this thread's slot; the daemon does not write it during the
    // thread's own syscalls.
    (unsafe { (*slot).invocation } != 0).then_some(slot)
}

/// Describes a refusal in the slot (the first few since the last fold) and
/// returns what the hook returns for it.
#[inline(always)]
unsafe fn refuse(slot: *mut Slot, operation: u32, describe: impl FnOnce(&mut Denial)) -> i32 {
    // SAFETY: as in `inside`.
    unsafe {
        let index = (*slot).denied as usize;
        (*slot).denied += 1;
        if let Some(denial) = (*slot).denials.get_mut(index) {
            // Only what is read for each operation is written (by
            // `describe`), with volatile stores: zeroing the entry would be
            // merged into a `memset`, which BPF cannot call. A name the
            // kernel cannot read stays empty.
            core::ptr::addr_of_mut!(denial.operation).write_volatile(operation);
            core::ptr::addr_of_mut!(denial.name[0]).write_volatile(0);
            describe(denial);
        }
    }
    -EPERM
}

#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    // `file_open(struct file *file)`, then the previous verdict.
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    let Some(slot) = inside() else {
        return 0;
    };
    let file: *const u8 = ctx.arg(0);
    // SAFETY: the slot is this thread's (see `inside`).
    unsafe { check_file(slot, file) }
}

#[inline(always)]
unsafe fn check_file(slot: *mut Slot, file: *const u8) -> i32 {
    let o = offsets();
    // SAFETY: kernel reads through the helper; the slot is this thread's.
    unsafe {
        let mode: u32 = read(file, o.file_f_mode).unwrap_or(FMODE_WRITE);
        let write = mode & FMODE_WRITE != 0;
        let need = if write { access::WRITE } else { access::READ };
        let inode: *const u8 = read(file, o.file_f_inode).unwrap_or(core::ptr::null());
        let sb: *const u8 = read(inode, o.inode_i_sb).unwrap_or(core::ptr::null());
        let dev: u32 = read(sb, o.super_block_s_dev).unwrap_or(0);
        let ino: u64 = read(inode, o.inode_i_ino).unwrap_or(0);
        let first: *const u8 = read(file, o.file_f_path_dentry).unwrap_or(core::ptr::null());
        let grants = (*slot).grants;
        if grants != NO_GRANTS && !first.is_null() {
            let mut dentry = first;
            for _ in 0..MAX_DEPTH {
                let inode: *const u8 = match read(dentry, o.dentry_d_inode) {
                    Some(inode) => inode,
                    None => break,
                };
                let ino: u64 = match read(inode, o.inode_i_ino) {
                    Some(ino) => ino,
                    None => break,
                };
                let key = FileKey { grants, dev, ino };
                if let Some(granted) = FILES.get(&key)
                    && *granted & need == need
                {
                    return 0;
                }
                let parent: *const u8 = match read(dentry, o.dentry_d_parent) {
                    Some(parent) => parent,
                    None => break,
                };
                if parent == dentry {
                    break;
                }
                dentry = parent;
            }
        }
        refuse(slot, operation::FILE_OPEN, |denial| {
            denial.dev = dev;
            denial.ino = ino;
            denial.write = write as u32;
            if let Some(name) = read::<*const u8>(first, o.dentry_d_name_name) {
                let _ = bpf_probe_read_kernel_str_bytes(name, &mut denial.name);
            }
        })
    }
}

#[lsm(hook = "socket_connect")]
pub fn socket_connect(ctx: LsmContext) -> i32 {
    // `socket_connect(struct socket *sock, struct sockaddr *address, int
    // addrlen)`, then the previous verdict.
    let previous: i32 = ctx.arg(3);
    if previous != 0 {
        return previous;
    }
    let Some(slot) = inside() else {
        return 0;
    };
    let (address, length): (*const u8, i32) = (ctx.arg(1), ctx.arg(2));
    // SAFETY: the slot is this thread's (see `inside`); kernel reads
    // through the helper.
    unsafe {
        let family: u16 = read(address, 0).unwrap_or(0);
        let port: u16 = read(address, 2).unwrap_or(0);
        let addr = match family {
            AF_INET if length >= 8 => read::<u32>(address, 4).map(|ip| (u64::from(ip), 0)),
            AF_INET6 if length >= 24 => match (read::<u64>(address, 8), read::<u64>(address, 16)) {
                (Some(high), Some(low)) => Some((high, low)),
                _ => None,
            },
            _ => None,
        };
        let grants = (*slot).grants;
        if let Some((first, second)) = addr
            && grants != NO_GRANTS
        {
            let key = AddressKey {
                grants,
                family,
                port,
                addr: [first, second],
            };
            if ADDRESSES.get(&key).is_some() {
                return 0;
            }
        }
        let (first, second) = addr.unwrap_or((0, 0));
        refuse(slot, operation::SOCKET_CONNECT, |denial| {
            denial.family = family;
            denial.port = port;
            denial.addr[0] = first;
            denial.addr[1] = second;
        })
    }
}

#[lsm(hook = "bprm_check_security")]
pub fn bprm_check_security(ctx: LsmContext) -> i32 {
    // `bprm_check_security(struct linux_binprm *bprm)`, then the previous
    // verdict.
    let previous: i32 = ctx.arg(1);
    if previous != 0 {
        return previous;
    }
    let Some(slot) = inside() else {
        return 0;
    };
    let bprm: *const u8 = ctx.arg(0);
    let o = offsets();
    // SAFETY: the slot is this thread's; kernel reads through the helper.
    unsafe {
        refuse(slot, operation::EXEC, |denial| {
            if let Some(name) = read::<*const u8>(bprm, o.linux_binprm_filename) {
                let _ = bpf_probe_read_kernel_str_bytes(name, &mut denial.name);
            }
        })
    }
}

/// Refuses `operation` for a thread inside an invocation; `previous` is the
/// verdict of the programs before this one.
#[inline(always)]
fn always_refused(previous: i32, operation: u32) -> i32 {
    if previous != 0 {
        return previous;
    }
    match inside() {
        // SAFETY: the slot is this thread's (see `inside`).
        Some(slot) => unsafe { refuse(slot, operation, |_| {}) },
        None => 0,
    }
}

#[lsm(hook = "ptrace_access_check")]
pub fn ptrace_access_check(ctx: LsmContext) -> i32 {
    // `(struct task_struct *child, unsigned int mode)`, then the previous
    // verdict.
    always_refused(ctx.arg(2), operation::PTRACE)
}

#[lsm(hook = "sb_mount")]
pub fn sb_mount(ctx: LsmContext) -> i32 {
    // `(const char *dev_name, const struct path *path, const char *type,
    // unsigned long flags, void *data)`, then the previous verdict.
    always_refused(ctx.arg(5), operation::MOUNT)
}

#[lsm(hook = "bpf")]
pub fn bpf(ctx: LsmContext) -> i32 {
    // `(int cmd, union bpf_attr *attr, unsigned int size, bool kernel)`
    // (recent kernels; 6.18 here), then the previous verdict.
    always_refused(ctx.arg(4), operation::BPF)
}
