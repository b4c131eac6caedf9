//! A small BTF reader: just enough to find struct member offsets in `/sys/kernel/btf/vmlinux`,
//! and a function's prototype before fexit reads its return value.
//!
//! Rust eBPF has no CO-RE relocations, so the kernel programs read `struct sock`, `struct net`,
//! `task_struct` and `nsproxy` fields at byte offsets the agent finds here at start-up and passes
//! in as the `OFFSETS` global. Format: the kernel's Documentation/bpf/btf.rst. Every read is
//! bounds-checked; garbage gives an error, never a panic.
use std::collections::HashMap;

use portx_common::KernelOffsets;
use thiserror::Error;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_FUNC: u32 = 12;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BtfError {
    #[error("kernel has no BTF ({path}: {reason}); portx needs CONFIG_DEBUG_INFO_BTF=y")]
    Missing { path: String, reason: String },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("kernel BTF has no complete `struct {0}`")]
    NoStruct(String),
    #[error("kernel BTF has no member `{path}` in `struct {strukt}`")]
    NoMember { strukt: String, path: String },
    #[error("member `{path}` of `struct {strukt}` is a bitfield or not byte-aligned")]
    NotByteAligned { strukt: String, path: String },
}

#[derive(Clone, Copy, Debug)]
struct Type {
    kind: u32,
    vlen: u32,
    kind_flag: bool,
    /// `size` for structs/unions, `type` for typedefs and modifiers.
    size_or_type: u32,
    /// Byte offset of the kind-specific data in the type section.
    extra: usize,
}

pub struct Btf {
    types: Vec<Type>,
    type_data: Vec<u8>,
    strings: Vec<u8>,
    /// Struct name -> type ids, in order.
    structs: HashMap<String, Vec<u32>>,
}

fn u32_at(b: &[u8], off: usize) -> Result<u32, BtfError> {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| BtfError::Malformed(format!("read past the end at {off}")))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let data = std::fs::read(path).map_err(|e| BtfError::Missing {
            path: path.into(),
            reason: e.to_string(),
        })?;
        Btf::from_bytes(&data)
    }

    pub fn from_bytes(data: &[u8]) -> Result<Btf, BtfError> {
        let magic = data
            .get(0..2)
            .map(|m| u16::from_le_bytes([m[0], m[1]]))
            .ok_or_else(|| BtfError::Malformed("shorter than its header".into()))?;
        if magic != MAGIC {
            return Err(BtfError::Malformed(format!(
                "bad magic {magic:#x} (big-endian BTF is not supported)"
            )));
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let section = |off: usize, len: usize, what: &str| -> Result<Vec<u8>, BtfError> {
            let start = hdr_len.checked_add(off);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(s), Some(e)) if e <= data.len() => Ok(data[s..e].to_vec()),
                _ => Err(BtfError::Malformed(format!("{what} section out of bounds"))),
            }
        };
        let type_data = section(
            u32_at(data, 8)? as usize,
            u32_at(data, 12)? as usize,
            "type",
        )?;
        let strings = section(
            u32_at(data, 16)? as usize,
            u32_at(data, 20)? as usize,
            "string",
        )?;
        let mut btf = Btf {
            types: Vec::new(),
            type_data,
            strings,
            structs: HashMap::new(),
        };
        btf.index()?;
        Ok(btf)
    }

    fn index(&mut self) -> Result<(), BtfError> {
        let mut off = 0usize;
        // Type id 0 is void; ids start at 1 = types[0].
        while off < self.type_data.len() {
            let name_off = u32_at(&self.type_data, off)?;
            let info = u32_at(&self.type_data, off + 4)?;
            let size_or_type = u32_at(&self.type_data, off + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = info & 0xffff;
            let extra = off + 12;
            let extra_len = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen as usize,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen as usize,
                2 | 7 | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_FUNC
                | 16 | KIND_TYPE_TAG => 0,
                other => {
                    return Err(BtfError::Malformed(format!(
                        "unknown kind {other} at type offset {off}"
                    )))
                }
            };
            off = extra + extra_len;
            if off > self.type_data.len() {
                return Err(BtfError::Malformed(
                    "type record runs past the section".into(),
                ));
            }
            let t = Type {
                kind,
                vlen,
                kind_flag: info >> 31 == 1,
                size_or_type,
                extra,
            };
            let id = self.types.len() as u32 + 1;
            self.types.push(t);
            if kind == KIND_STRUCT && vlen > 0 {
                let name = self.name(name_off)?.to_string();
                if !name.is_empty() {
                    self.structs.entry(name).or_default().push(id);
                }
            }
        }
        Ok(())
    }

    fn name(&self, off: u32) -> Result<&str, BtfError> {
        let start = off as usize;
        let tail = self
            .strings
            .get(start..)
            .ok_or_else(|| BtfError::Malformed(format!("string offset {off} out of bounds")))?;
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        std::str::from_utf8(&tail[..end])
            .map_err(|_| BtfError::Malformed(format!("string at {off} is not UTF-8")))
    }

    fn ty(&self, id: u32) -> Result<Type, BtfError> {
        id.checked_sub(1)
            .and_then(|i| self.types.get(i as usize))
            .copied()
            .ok_or_else(|| BtfError::Malformed(format!("type id {id} out of range")))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn resolve(&self, mut id: u32) -> Result<Type, BtfError> {
        for _ in 0..32 {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok(t),
            }
        }
        Err(BtfError::Malformed("typedef chain too long".into()))
    }

    /// Finds member `name` in a struct/union, looking through anonymous members. Returns
    /// (bit offset, bitfield size, member type id).
    fn find_member(
        &self,
        t: Type,
        name: &str,
        depth: u32,
    ) -> Result<Option<(u32, u32, u32)>, BtfError> {
        if depth > 16 {
            return Err(BtfError::Malformed(
                "anonymous members nested too deep".into(),
            ));
        }
        for i in 0..t.vlen as usize {
            let m = t.extra + 12 * i;
            let m_name = u32_at(&self.type_data, m)?;
            let m_type = u32_at(&self.type_data, m + 4)?;
            let raw = u32_at(&self.type_data, m + 8)?;
            let (bits, bitfield) = if t.kind_flag {
                (raw & 0x00ff_ffff, raw >> 24)
            } else {
                (raw, 0)
            };
            let m_str = self.name(m_name)?;
            if m_str == name {
                return Ok(Some((bits, bitfield, m_type)));
            }
            if m_str.is_empty() {
                let inner = self.resolve(m_type)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some((b, bf, ty)) = self.find_member(inner, name, depth + 1)? {
                        return Ok(Some((bits + b, bf, ty)));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Byte offset of a dotted member path (e.g. `__sk_common.skc_num`) in `struct strukt`.
    pub fn member_offset(&self, strukt: &str, path: &str) -> Result<u32, BtfError> {
        Ok(self.member(strukt, path)?.0)
    }

    /// Byte offset and size of a dotted member path in `struct strukt` (size 0 for a pointer or
    /// an array).
    pub fn member_offset_and_size(&self, strukt: &str, path: &str) -> Result<(u32, u32), BtfError> {
        let (offset, ty) = self.member(strukt, path)?;
        let t = self.resolve(ty)?;
        let size = match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 => t.size_or_type,
            // (Pointers, arrays: not asked for.)
            _ => 0,
        };
        Ok((offset, size))
    }

    /// Byte offset and type id of a dotted member path in `struct strukt`.
    fn member(&self, strukt: &str, path: &str) -> Result<(u32, u32), BtfError> {
        let id = *self
            .structs
            .get(strukt)
            .and_then(|ids| ids.first())
            .ok_or_else(|| BtfError::NoStruct(strukt.into()))?;
        let no_member = || BtfError::NoMember {
            strukt: strukt.into(),
            path: path.into(),
        };
        let mut t = self.ty(id)?;
        let mut bits = 0u32;
        let mut last = 0;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
                return Err(no_member());
            }
            let (b, bitfield, ty) = self.find_member(t, part, 0)?.ok_or_else(no_member)?;
            if bitfield != 0 {
                return Err(BtfError::NotByteAligned {
                    strukt: strukt.into(),
                    path: path.into(),
                });
            }
            bits = bits.checked_add(b).ok_or_else(no_member)?;
            last = ty;
            if parts.peek().is_some() {
                t = self.resolve(ty)?;
            }
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::NotByteAligned {
                strukt: strukt.into(),
                path: path.into(),
            });
        }
        Ok((bits / 8, last))
    }
}

/// A function's prototype as BTF has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prototype {
    pub params: u32,
    /// The return type is a 4-byte integer (`int`).
    pub returns_int: bool,
}

impl Btf {
    /// The prototype of function `name`; None where BTF has no such function (not traceable:
    /// fentry/fexit need it).
    pub fn prototype(&self, name: &str) -> Result<Option<Prototype>, BtfError> {
        for t in &self.types {
            if t.kind != KIND_FUNC {
                continue;
            }
            // A type's name is the first word of its record, 12 bytes before its extra data.
            let name_off = u32_at(&self.type_data, t.extra - 12)?;
            if self.name(name_off)? != name {
                continue;
            }
            let proto = self.ty(t.size_or_type)?;
            if proto.kind != KIND_FUNC_PROTO {
                return Err(BtfError::Malformed(format!(
                    "function {name} has no prototype"
                )));
            }
            // size_or_type is the return type here; 0 is void.
            let returns_int = proto.size_or_type != 0 && {
                let r = self.resolve(proto.size_or_type)?;
                r.kind == KIND_INT && r.size_or_type == 4
            };
            return Ok(Some(Prototype {
                params: proto.vlen,
                returns_int,
            }));
        }
        Ok(None)
    }
}

/// The offsets the kernel programs need (see [`KernelOffsets`]).
pub fn kernel_offsets(btf: &Btf) -> Result<KernelOffsets, BtfError> {
    let sk = |path: &str| btf.member_offset("sock", path);
    let (regs_arg0, regs_arg1) = syscall_arg_regs(btf)?;
    let fds = descriptor_table(btf)?;
    Ok(KernelOffsets {
        sock_family: sk("__sk_common.skc_family")?,
        sock_protocol: sk("sk_protocol")?,
        sock_dport: sk("__sk_common.skc_dport")?,
        sock_rcv_saddr: sk("__sk_common.skc_rcv_saddr")?,
        sock_daddr: sk("__sk_common.skc_daddr")?,
        sock_v6_rcv_saddr: sk("__sk_common.skc_v6_rcv_saddr")?,
        sock_v6_daddr: sk("__sk_common.skc_v6_daddr")?,
        sock_num: btf.member_offset("sock", "__sk_common.skc_num")?,
        inet_sport: btf.member_offset("inet_sock", "inet_sport")?,
        sock_state: sk("__sk_common.skc_state")?,
        sock_net: btf.member_offset("sock", "__sk_common.skc_net.net")?,
        net_inum: btf.member_offset("net", "ns.inum")?,
        task_nsproxy: btf.member_offset("task_struct", "nsproxy")?,
        nsproxy_net: btf.member_offset("nsproxy", "net_ns")?,
        sock_max_ack_backlog: sk("sk_max_ack_backlog")?,
        net_cookie: net_cookie(btf)?,
        regs_arg0,
        regs_arg1,
        task_files: fds[0],
        files_fdt: fds[1],
        fdtable_max_fds: fds[2],
        fdtable_fd: fds[3],
        file_private_data: fds[4],
        socket_sk: fds[5],
    })
}

/// The way from a task's fd to its socket: (struct, member) in the order of
/// `KernelOffsets::task_files` and the five after it.
const DESCRIPTOR_STEPS: [(&str, &str); 6] = [
    ("task_struct", "files"),
    ("files_struct", "fdt"),
    ("fdtable", "max_fds"),
    ("fdtable", "fd"),
    ("file", "private_data"),
    ("socket", "sk"),
];

/// The offsets of [`DESCRIPTOR_STEPS`],
/// all zero where BTF lacks a step: then a failed call is not followed to its socket, and
/// the agent says so at start.
fn descriptor_table(btf: &Btf) -> Result<[u32; 6], BtfError> {
    let mut found = [0; 6];
    for (slot, (strukt, member)) in found.iter_mut().zip(DESCRIPTOR_STEPS) {
        match btf.member_offset(strukt, member) {
            Ok(offset) => *slot = offset,
            Err(BtfError::NoMember { .. } | BtfError::NoStruct(_)) => return Ok([0; 6]),
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// `struct pt_regs`: where a syscall's first two arguments are at its exit, on this agent's
/// architecture; (0, 0) on others, or where BTF has no such members (then bind()'s entry is
/// traced as well, see `loader`).
fn syscall_arg_regs(btf: &Btf) -> Result<(u32, u32), BtfError> {
    let found = if cfg!(target_arch = "x86_64") {
        btf.member_offset("pt_regs", "di")
            .and_then(|di| Ok((di, btf.member_offset("pt_regs", "si")?)))
    } else if cfg!(target_arch = "aarch64") {
        // The return value is written over regs[0]; the first argument stays in orig_x0.
        btf.member_offset("pt_regs", "orig_x0")
            .and_then(|x0| Ok((x0, btf.member_offset("pt_regs", "regs")? + 8)))
    } else {
        return Ok((0, 0));
    };
    match found {
        Ok(regs) => Ok(regs),
        Err(BtfError::NoMember { .. } | BtfError::NoStruct(_)) => Ok((0, 0)),
        Err(e) => Err(e),
    }
}

/// `struct net` -> `net_cookie` if BTF has it as 8 bytes (u64, or `atomic64_t` before Linux
/// 5.12), else 0: then every record reads the namespace's `ns.inum` itself.
fn net_cookie(btf: &Btf) -> Result<u32, BtfError> {
    match btf.member_offset_and_size("net", "net_cookie") {
        Ok((offset, 8)) => Ok(offset),
        Ok(_) | Err(BtfError::NoMember { .. }) => Ok(0),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF blobs for tests.
    #[derive(Default)]
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Self {
                strings: vec![0],
                next_id: 1,
                ..Default::default()
            }
        }
        fn s(&mut self, name: &str) -> u32 {
            if name.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            off
        }
        fn rec(&mut self, name: &str, kind: u32, vlen: u32, kflag: bool, st: u32) -> u32 {
            let n = self.s(name);
            let info = (kind << 24) | vlen | if kflag { 1 << 31 } else { 0 };
            for v in [n, info, st] {
                self.types.extend_from_slice(&v.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }
        fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.rec(name, KIND_INT, 0, false, size);
            self.types.extend_from_slice(&(size * 8).to_le_bytes());
            id
        }
        /// members: (name, type id, bit offset or (bitfield<<24 | offset) with kflag)
        fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kflag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let id = self.rec(name, kind, members.len() as u32, kflag, size);
            for &(m, ty, off) in members {
                let n = self.s(m);
                for v in [n, ty, off] {
                    self.types.extend_from_slice(&v.to_le_bytes());
                }
            }
            id
        }
        fn typedef(&mut self, name: &str, target: u32) -> u32 {
            self.rec(name, KIND_TYPEDEF, 0, false, target)
        }
        /// A function `name` returning `ret` (0: void) with parameters of the types `params`.
        fn func(&mut self, name: &str, ret: u32, params: &[u32]) -> u32 {
            let proto = self.rec("", KIND_FUNC_PROTO, params.len() as u32, false, ret);
            for &ty in params {
                self.types.extend_from_slice(&0u32.to_le_bytes());
                self.types.extend_from_slice(&ty.to_le_bytes());
            }
            self.rec(name, KIND_FUNC, 0, false, proto)
        }
        fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for v in [
                24u32,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// struct sock_common { union { u64 pair; struct { u32 a; u32 b; }; }; u16 skc_num @ byte 14 ...
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let u16_ = b.int("u16", 2);
        let u32_ = b.int("u32", 4);
        let inner = b.composite(
            KIND_STRUCT,
            "",
            8,
            false,
            &[("skc_daddr", u32_, 0), ("skc_rcv_saddr", u32_, 32)],
        );
        let anon_union = b.composite(
            KIND_UNION,
            "",
            8,
            false,
            &[("skc_addrpair", u32_, 0), ("", inner, 0)],
        );
        let ports = b.composite(
            KIND_STRUCT,
            "",
            4,
            false,
            &[("skc_dport", u16_, 0), ("skc_num", u16_, 16)],
        );
        let net = b.composite(KIND_STRUCT, "possible_net_t", 8, false, &[("net", u32_, 0)]);
        let net_t = b.typedef("possible_net_t_t", net);
        let common = b.composite(
            KIND_STRUCT,
            "sock_common",
            64,
            true,
            &[
                ("", anon_union, 0),
                ("", ports, 96),
                ("flags", u32_, (1 << 24) | 130),
                ("skc_net", net_t, 384),
            ],
        );
        b.composite(
            KIND_STRUCT,
            "sock",
            128,
            false,
            &[("__sk_common", common, 0)],
        );
        // a forward-declared duplicate without members must not shadow the complete one
        b.composite(KIND_STRUCT, "empty", 0, false, &[]);
        let int = b.int("int", 4);
        let int_t = b.typedef("int_t", int);
        b.func("__sys_bind", int_t, &[int, u32_, int]);
        b.func("__sys_connect", int, &[int, u32_, int, int]);
        b.func("noop", 0, &[]);
        b.func("narrow", u16_, &[u16_]);
        b.build()
    }

    #[test]
    fn finds_function_prototypes() {
        let btf = Btf::from_bytes(&sample()).unwrap();
        let proto = |params, returns_int| {
            Some(Prototype {
                params,
                returns_int,
            })
        };
        assert_eq!(btf.prototype("__sys_bind").unwrap(), proto(3, true));
        assert_eq!(btf.prototype("__sys_connect").unwrap(), proto(4, true));
        assert_eq!(btf.prototype("noop").unwrap(), proto(0, false));
        assert_eq!(btf.prototype("narrow").unwrap(), proto(1, false));
        assert_eq!(btf.prototype("absent").unwrap(), None);
        // A struct of that name is not a function.
        assert_eq!(btf.prototype("sock").unwrap(), None);
    }

    #[test]
    fn finds_members_through_anonymous_unions_and_typedefs() {
        let btf = Btf::from_bytes(&sample()).unwrap();
        assert_eq!(
            btf.member_offset("sock", "__sk_common.skc_num").unwrap(),
            14
        );
        assert_eq!(
            btf.member_offset("sock_common", "skc_rcv_saddr").unwrap(),
            4
        );
        assert_eq!(
            btf.member_offset("sock", "__sk_common.skc_net.net")
                .unwrap(),
            48
        );
    }

    /// A `struct net` with `net_cookie` of type `cookie` (None: no such member) at byte 64.
    fn net_with_cookie(cookie: Option<&str>) -> Btf {
        let mut b = Builder::new();
        let u32_ = b.int("unsigned int", 4);
        let u64_ = b.int("long long unsigned int", 8);
        let s64 = b.int("long long int", 8);
        let ty = match cookie {
            Some("u64") => Some(b.typedef("u64", u64_)),
            Some("atomic64_t") => {
                let counter = b.composite(KIND_STRUCT, "", 8, false, &[("counter", s64, 0)]);
                Some(b.typedef("atomic64_t", counter))
            }
            Some("u32") => Some(u32_),
            _ => None,
        };
        let mut members = vec![("ifindex", u32_, 0)];
        if let Some(ty) = ty {
            members.push(("net_cookie", ty, 64 * 8));
        }
        b.composite(KIND_STRUCT, "net", 128, false, &members);
        Btf::from_bytes(&b.build()).unwrap()
    }

    /// The structs on the way from a task's fd to its socket, each with its step at byte
    /// 8 * (its place + 1); `missing` leaves that struct's member out.
    fn descriptor_structs(missing: Option<&str>) -> Btf {
        let mut b = Builder::new();
        let u64_ = b.int("long unsigned int", 8);
        for strukt in ["task_struct", "files_struct", "fdtable", "file", "socket"] {
            let members: Vec<(&str, u32, u32)> = (1u32..)
                .zip(DESCRIPTOR_STEPS)
                .filter(|&(_, (s, m))| s == strukt && missing != Some(m))
                .map(|(place, (_, m))| (m, u64_, place * 64))
                .collect();
            b.composite(KIND_STRUCT, strukt, 64, false, &members);
        }
        Btf::from_bytes(&b.build()).unwrap()
    }

    #[test]
    fn the_way_from_an_fd_to_its_socket_is_found_whole_or_not_at_all() {
        assert_eq!(
            descriptor_table(&descriptor_structs(None)),
            Ok([8, 16, 24, 32, 40, 48])
        );
        for missing in ["files", "max_fds", "sk"] {
            assert_eq!(
                descriptor_table(&descriptor_structs(Some(missing))),
                Ok([0; 6]),
                "without {missing}"
            );
        }
    }

    #[test]
    fn the_namespace_cookie_is_used_only_where_it_has_8_bytes() {
        assert_eq!(net_cookie(&net_with_cookie(Some("u64"))), Ok(64));
        assert_eq!(net_cookie(&net_with_cookie(Some("atomic64_t"))), Ok(64));
        assert_eq!(net_cookie(&net_with_cookie(Some("u32"))), Ok(0));
        assert_eq!(net_cookie(&net_with_cookie(None)), Ok(0));
        assert_eq!(
            net_with_cookie(Some("atomic64_t")).member_offset_and_size("net", "net_cookie"),
            Ok((64, 8))
        );
        // No `struct net` at all is still an error: the namespace's inode is read from it.
        let btf = Btf::from_bytes(&sample()).unwrap();
        assert_eq!(net_cookie(&btf), Err(BtfError::NoStruct("net".into())));
    }

    #[test]
    fn syscall_arguments_at_exit_are_found_in_pt_regs_or_left_unknown() {
        // x86-64's layout: si and di at 104 and 112.
        let mut b = Builder::new();
        let u64_ = b.int("long unsigned int", 8);
        b.composite(
            KIND_STRUCT,
            "pt_regs",
            168,
            false,
            &[("si", u64_, 104 * 8), ("di", u64_, 112 * 8)],
        );
        let x86 = Btf::from_bytes(&b.build()).unwrap();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(syscall_arg_regs(&x86), Ok((112, 104)));
        }
        // No `struct pt_regs`, or not the members this architecture names: unknown, and bind()
        // is traced at its entry too.
        let btf = Btf::from_bytes(&sample()).unwrap();
        assert_eq!(syscall_arg_regs(&btf), Ok((0, 0)));
        let mut b = Builder::new();
        let u64_ = b.int("long unsigned int", 8);
        b.composite(KIND_STRUCT, "pt_regs", 8, false, &[("pc", u64_, 0)]);
        assert_eq!(
            syscall_arg_regs(&Btf::from_bytes(&b.build()).unwrap()),
            Ok((0, 0))
        );
    }

    #[test]
    fn errors_name_what_is_missing() {
        let btf = Btf::from_bytes(&sample()).unwrap();
        assert_eq!(
            btf.member_offset("net", "ns.inum"),
            Err(BtfError::NoStruct("net".into()))
        );
        assert!(matches!(
            btf.member_offset("sock", "__sk_common.nope"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("sock_common", "flags"),
            Err(BtfError::NotByteAligned { .. })
        ));
        assert!(matches!(
            btf.member_offset("sock", "__sk_common.skc_num.deeper"),
            Err(BtfError::NoMember { .. })
        ));
    }

    #[test]
    fn truncated_or_garbled_blobs_are_errors_not_panics() {
        let good = sample();
        for len in 0..good.len() {
            let _ = Btf::from_bytes(&good[..len]);
        }
        let mut state = 0x2545_f491u32;
        for i in 0..2000 {
            let mut bad = good.clone();
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                let pos = state as usize % bad.len();
                bad[pos] = (state >> 8) as u8;
            }
            if let Ok(btf) = Btf::from_bytes(&bad) {
                let _ = btf.member_offset("sock", "__sk_common.skc_num");
                let _ = btf.prototype("__sys_bind");
                let _ = kernel_offsets(&btf);
            }
            assert!(i < 2000);
        }
        assert!(Btf::from_bytes(&[0x9f, 0xeb]).is_err());
        assert!(Btf::from_bytes(b"not btf at all").is_err());
    }

    #[test]
    fn this_kernels_offsets() {
        let btf = match Btf::from_sys_fs() {
            Ok(b) => b,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        let o = kernel_offsets(&btf).expect("offsets of the running kernel");
        eprintln!("this kernel: {o:?}");
        // Plausible on any kernel: the port lives in the first cache line of sock_common.
        assert!(o.sock_num > 0 && o.sock_num < 64, "{o:?}");
        assert!(o.sock_net > o.sock_num && o.sock_net < 128, "{o:?}");
        assert!(o.net_inum > 0 && o.net_inum < 1024, "{o:?}");
        // Every kernel portx supports (5.10 on) has it: u64, or atomic64_t before 5.12.
        assert!(o.net_cookie > o.net_inum, "{o:?}");
        assert!(o.task_nsproxy > 0 && o.nsproxy_net > 0, "{o:?}");
        // skc_state follows skc_family (a u16) in every layout since 2.6.
        assert_eq!(o.sock_state, o.sock_family + 2, "{o:?}");
        // The state program's one-copy read of sock_common's head applies on x86-64.
        #[cfg(target_arch = "x86_64")]
        assert!(o.head_matches(), "{o:?}");
        // Every kernel portx supports has the descriptor table; task_struct.files is far in.
        assert!(o.task_files > 0 && o.file_private_data > 0, "{o:?}");
        // x86-64's pt_regs is ABI: di and si are at 112 and 104.
        #[cfg(target_arch = "x86_64")]
        assert_eq!((o.regs_arg0, o.regs_arg1), (112, 104), "{o:?}");
    }
}
