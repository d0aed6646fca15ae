//! Field offsets of the kernel structures the LSM programs read, found in
//! the running kernel's BTF (`/sys/kernel/btf/vmlinux`). aya-ebpf has no
//! CO-RE relocations, so the loader reads the offsets here and hands them
//! to the programs as a global (`OFFSETS`): no generated bindings and no
//! build-time tool are needed, and the same binary runs on any kernel with
//! BTF.
//!
//! Only what that takes is parsed: the type section's records (to skip
//! them) and the members of structs and unions, following anonymous members
//! into their struct or union.

use std::collections::HashMap;

use sandgate_probes_common::Offsets;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

struct Type {
    name: u32,
    kind: u32,
    kind_flag: bool,
    /// The referred type, for typedefs and qualifiers.
    refers: u32,
    /// (name, type, bit offset) of a struct's or union's members.
    members: Vec<(u32, u32, u32)>,
}

/// The parsed type section of a BTF blob.
pub(super) struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
    structs: HashMap<String, u32>,
}

fn u32_at(data: &[u8], at: usize) -> Result<u32, String> {
    data.get(at..at + 4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| format!("BTF is truncated at byte {at}"))
}

impl Btf {
    pub(super) fn from_sys_fs() -> Result<Btf, String> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| {
            format!("BTF missing: cannot read {path} ({e}); BPF LSM needs a kernel built with CONFIG_DEBUG_INFO_BTF")
        })?;
        Btf::parse(&data)
    }

    pub(super) fn parse(data: &[u8]) -> Result<Btf, String> {
        if data.get(..2) != Some(&[0x9f_u8, 0xeb][..]) {
            return Err("BTF has a bad magic number (not little-endian BTF)".into());
        }
        let header = u32_at(data, 4)? as usize;
        let type_off = header + u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = header + u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let strings = data
            .get(str_off..str_off + str_len)
            .ok_or("BTF string section is out of bounds")?
            .to_vec();
        let end = type_off + type_len;
        // Type ids start at 1; 0 is void.
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            kind_flag: false,
            refers: 0,
            members: Vec::new(),
        }];
        let mut at = type_off;
        while at < end {
            let name = u32_at(data, at)?;
            let info = u32_at(data, at + 4)?;
            let size_or_type = u32_at(data, at + 8)?;
            at += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => at += 4,
                KIND_ARRAY => at += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        members.push((
                            u32_at(data, at)?,
                            u32_at(data, at + 4)?,
                            u32_at(data, at + 8)?,
                        ));
                        at += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => at += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => at += 12 * vlen,
                _ => {}
            }
            types.push(Type {
                name,
                kind,
                kind_flag: info >> 31 == 1,
                refers: size_or_type,
                members,
            });
        }
        let mut btf = Btf {
            types,
            strings,
            structs: HashMap::new(),
        };
        for (id, ty) in btf.types.iter().enumerate() {
            if ty.kind == KIND_STRUCT && ty.name != 0 {
                btf.structs
                    .entry(btf.string(ty.name).to_owned())
                    .or_insert(id as u32);
            }
        }
        Ok(btf)
    }

    fn string(&self, offset: u32) -> &str {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    /// The struct or union `id` names, past typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            let ty = self.types.get(id as usize)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.refers
                }
                _ => return Some(ty),
            }
        }
        None
    }

    /// The byte offset of `field` in `ty`, looking into anonymous members.
    fn find(&self, ty: &Type, field: &str, depth: u32) -> Option<u32> {
        if depth > 8 {
            return None;
        }
        for &(name, member_type, offset) in &ty.members {
            let bits = if ty.kind_flag {
                offset & 0xff_ffff
            } else {
                offset
            };
            if name == 0 {
                if let Some(inner) = self.resolve(member_type)
                    && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(found) = self.find(inner, field, depth + 1)
                {
                    return Some(bits / 8 + found);
                }
            } else if self.string(name) == field {
                return Some(bits / 8);
            }
        }
        None
    }

    /// The byte offset of `path` (fields separated by dots) in struct
    /// `name`.
    pub(super) fn offset(&self, name: &str, path: &str) -> Result<u32, String> {
        let missing = || format!("the kernel's BTF has no {name}.{path}");
        let mut ty = self
            .structs
            .get(name)
            .and_then(|&id| self.types.get(id as usize))
            .ok_or_else(missing)?;
        let mut total = 0;
        let fields: Vec<&str> = path.split('.').collect();
        for (index, field) in fields.iter().enumerate() {
            total += self.find(ty, field, 0).ok_or_else(missing)?;
            if index + 1 < fields.len() {
                let member = member_type(self, ty, field).ok_or_else(missing)?;
                ty = self.resolve(member).ok_or_else(missing)?;
            }
        }
        Ok(total)
    }

    /// The offsets the LSM programs need.
    pub(super) fn offsets(&self) -> Result<Offsets, String> {
        Ok(Offsets {
            file_f_path_dentry: self.offset("file", "f_path.dentry")?,
            file_f_inode: self.offset("file", "f_inode")?,
            file_f_mode: self.offset("file", "f_mode")?,
            inode_i_ino: self.offset("inode", "i_ino")?,
            inode_i_sb: self.offset("inode", "i_sb")?,
            super_block_s_dev: self.offset("super_block", "s_dev")?,
            dentry_d_parent: self.offset("dentry", "d_parent")?,
            dentry_d_inode: self.offset("dentry", "d_inode")?,
            dentry_d_name_name: self.offset("dentry", "d_name.name")?,
            linux_binprm_filename: self.offset("linux_binprm", "filename")?,
        })
    }
}

/// The type of member `field` of `ty` (looking into anonymous members).
fn member_type(btf: &Btf, ty: &Type, field: &str) -> Option<u32> {
    for &(name, member_type, _) in &ty.members {
        if name == 0 {
            if let Some(inner) = btf.resolve(member_type)
                && matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                && let Some(found) = self::member_type(btf, inner, field)
            {
                return Some(found);
            }
        } else if btf.string(name) == field {
            return Some(member_type);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_of_this_kernel_are_found_and_distinct() {
        let Ok(btf) = Btf::from_sys_fs() else {
            // No BTF here: the loader reports it; nothing to check.
            return;
        };
        let o = btf.offsets().expect("every field is in the kernel's BTF");
        // struct qstr's name follows its hash and length.
        assert_eq!(
            o.dentry_d_name_name,
            btf.offset("dentry", "d_name").expect("dentry.d_name") + 8
        );
        assert_ne!(o.file_f_inode, o.file_f_mode);
        assert_ne!(o.dentry_d_parent, o.dentry_d_inode);
        assert!(btf.offset("file", "no_such_field").is_err());
    }

    #[test]
    fn bad_btf_is_refused_with_a_reason() {
        let err = Btf::parse(b"not btf").err().expect("refused");
        assert!(err.contains("magic"), "{err}");
    }
}
