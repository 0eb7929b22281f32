//! The NBD wire protocol (fixed newstyle handshake, simple replies) as pure
//! functions over byte buffers: no sockets, so every parser can be fed
//! arbitrary bytes by tests and the fuzzer.
//!
//! Parsers follow one shape: `parse_*(buf) -> Result<Option<(T, consumed)>, _>`.
//! `Ok(None)` means "not enough bytes yet, read more"; an `Err` means the
//! stream cannot be trusted any more and the connection must be closed.
//! Problems that leave the stream in sync (an option with malformed data, a
//! request out of bounds) are values, answered with an error reply.
//!
//! Reference: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use bytes::{BufMut, BytesMut};

/// "NBDMAGIC": the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
const CLIENT_FLAGS_KNOWN: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Transmission flags (per export).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;

/// Info types (in NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
const CMD_FLAGS_KNOWN: u16 = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Error values in replies (errno numbers, as the protocol fixes them).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Sizes of fixed parts of the protocol.
pub const GREETING_BYTES: usize = 18;
pub const CLIENT_FLAGS_BYTES: usize = 4;
pub const OPTION_HEADER_BYTES: usize = 16;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// The zero padding after an NBD_OPT_EXPORT_NAME reply, unless NO_ZEROES.
const EXPORT_NAME_PADDING_BYTES: usize = 124;

/// Export names longer than this are refused (the protocol's own limit).
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;
/// The largest option payload accepted: a name, its length and some info
/// requests. Anything larger is not an option we know how to honour.
pub const OPTION_BYTES_MAX: usize = EXPORT_NAME_BYTES_MAX + 1024;
/// The largest READ or WRITE payload, advertised as the maximum block size
/// (32 MiB is what the protocol tells clients to assume by default).
pub const REQUEST_BYTES_MAX: usize = 32 << 20;

/// Why a stream cannot be parsed further: the connection must close.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum ProtoError {
    #[error("client flags {0:#x} include flags this server does not know")]
    UnknownClientFlags(u32),
    #[error("client does not speak fixed newstyle (flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("option magic is {0:#x}, expected IHAVEOPT")]
    OptionMagic(u64),
    #[error("option {option} carries {len} bytes; at most {OPTION_BYTES_MAX} are accepted")]
    OptionTooLong { option: u32, len: u32 },
    #[error("request magic is {0:#x}, expected {REQUEST_MAGIC:#x}")]
    RequestMagic(u32),
    #[error("write of {len} bytes; at most {REQUEST_BYTES_MAX} per request")]
    WriteTooLong { len: u32 },
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

// ---------------------------------------------------------------- handshake

/// The server's greeting: magic, IHAVEOPT, handshake flags.
pub fn encode_greeting(out: &mut BytesMut) {
    out.put_u64(NBD_MAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

/// What the client answered to the greeting.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    pub no_zeroes: bool,
}

/// Parses the client's 32-bit flags. Unknown flags mean the client expects
/// something we do not do; the protocol says to close then.
pub fn parse_client_flags(buf: &[u8]) -> Result<Option<(ClientFlags, usize)>, ProtoError> {
    if buf.len() < CLIENT_FLAGS_BYTES {
        return Ok(None);
    }
    let flags = be_u32(buf);
    if flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        // Plain newstyle clients cannot handle error replies to options.
        return Err(ProtoError::NotFixedNewstyle(flags));
    }
    Ok(Some((
        ClientFlags {
            no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        },
        CLIENT_FLAGS_BYTES,
    )))
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// The info types the client asked for (the server may send more).
    pub requests: Vec<u16>,
}

/// One option request of the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionRequest {
    /// NBD_OPT_EXPORT_NAME: the old way to pick an export; no reply on error.
    ExportName(String),
    Abort,
    List,
    Info(InfoRequest),
    Go(InfoRequest),
    /// An option we do not implement (STARTTLS, STRUCTURED_REPLY, ...):
    /// answered with NBD_REP_ERR_UNSUP.
    Unsupported {
        option: u32,
    },
    /// A known option whose data is malformed: answered with
    /// NBD_REP_ERR_INVALID and the reason.
    Malformed {
        option: u32,
        reason: &'static str,
    },
}

/// Parses one option request (header and data).
pub fn parse_option(buf: &[u8]) -> Result<Option<(OptionRequest, usize)>, ProtoError> {
    if buf.len() < OPTION_HEADER_BYTES {
        return Ok(None);
    }
    let magic = be_u64(buf);
    if magic != IHAVEOPT {
        return Err(ProtoError::OptionMagic(magic));
    }
    let option = be_u32(&buf[8..]);
    let len = be_u32(&buf[12..]);
    if len as usize > OPTION_BYTES_MAX {
        return Err(ProtoError::OptionTooLong { option, len });
    }
    let total = OPTION_HEADER_BYTES + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let data = &buf[OPTION_HEADER_BYTES..total];
    let request = match option {
        OPT_EXPORT_NAME => match std::str::from_utf8(data) {
            Ok(name) => OptionRequest::ExportName(name.to_owned()),
            Err(_) => OptionRequest::Malformed {
                option,
                reason: "export name is not UTF-8",
            },
        },
        OPT_ABORT => OptionRequest::Abort,
        OPT_LIST if data.is_empty() => OptionRequest::List,
        OPT_LIST => OptionRequest::Malformed {
            option,
            reason: "NBD_OPT_LIST carries no data",
        },
        OPT_INFO | OPT_GO => match parse_info_request(data) {
            Ok(r) if option == OPT_GO => OptionRequest::Go(r),
            Ok(r) => OptionRequest::Info(r),
            Err(reason) => OptionRequest::Malformed { option, reason },
        },
        _ => OptionRequest::Unsupported { option },
    };
    Ok(Some((request, total)))
}

/// `u32 name length, name, u16 count, count × u16 info type`.
fn parse_info_request(data: &[u8]) -> Result<InfoRequest, &'static str> {
    if data.len() < 4 {
        return Err("too short for a name length");
    }
    let name_len = be_u32(data) as usize;
    if name_len > EXPORT_NAME_BYTES_MAX {
        return Err("export name longer than 4096 bytes");
    }
    let rest = &data[4..];
    if rest.len() < name_len + 2 {
        return Err("name length runs past the option data");
    }
    let name = std::str::from_utf8(&rest[..name_len]).map_err(|_| "export name is not UTF-8")?;
    let rest = &rest[name_len..];
    let count = be_u16(rest) as usize;
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return Err("info request count does not match the option length");
    }
    Ok(InfoRequest {
        name: name.to_owned(),
        requests: rest.chunks_exact(2).map(be_u16).collect(),
    })
}

/// An option reply: header, then `data`.
pub fn encode_option_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// An error reply carrying a human-readable message (the protocol allows it).
pub fn encode_option_error(out: &mut BytesMut, option: u32, reply: u32, message: &str) {
    debug_assert!(reply & REP_ERR != 0, "not an error reply type");
    encode_option_reply(out, option, reply, message.as_bytes());
}

/// NBD_REP_SERVER: one export in the answer to NBD_OPT_LIST.
pub fn encode_rep_server(out: &mut BytesMut, name: &str) {
    let mut data = BytesMut::with_capacity(4 + name.len());
    data.put_u32(name.len() as u32);
    data.put_slice(name.as_bytes());
    encode_option_reply(out, OPT_LIST, REP_SERVER, &data);
}

/// NBD_REP_INFO with NBD_INFO_EXPORT: size and transmission flags.
pub fn encode_info_export(out: &mut BytesMut, option: u32, size_bytes: u64, flags: u16) {
    let mut data = [0u8; 12];
    data[..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    data[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    data[10..].copy_from_slice(&flags.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// NBD_REP_INFO with NBD_INFO_NAME.
pub fn encode_info_name(out: &mut BytesMut, option: u32, name: &str) {
    let mut data = BytesMut::with_capacity(2 + name.len());
    data.put_u16(INFO_NAME);
    data.put_slice(name.as_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// NBD_REP_INFO with NBD_INFO_DESCRIPTION (at most 4 KiB, as the protocol asks).
pub fn encode_info_description(out: &mut BytesMut, option: u32, description: &str) {
    let mut end = description.len().min(4096);
    while !description.is_char_boundary(end) {
        end -= 1;
    }
    let mut data = BytesMut::with_capacity(2 + end);
    data.put_u16(INFO_DESCRIPTION);
    data.put_slice(&description.as_bytes()[..end]);
    encode_option_reply(out, option, REP_INFO, &data);
}

/// Block size constraints, in bytes.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BlockSize {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// NBD_REP_INFO with NBD_INFO_BLOCK_SIZE.
pub fn encode_info_block_size(out: &mut BytesMut, option: u32, bs: BlockSize) {
    let mut data = [0u8; 14];
    data[..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    data[2..6].copy_from_slice(&bs.min.to_be_bytes());
    data[6..10].copy_from_slice(&bs.preferred.to_be_bytes());
    data[10..].copy_from_slice(&bs.max.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &data);
}

/// The answer to NBD_OPT_EXPORT_NAME: size, flags, and (unless the client
/// asked for NO_ZEROES) 124 bytes of padding.
pub fn encode_export_name_reply(out: &mut BytesMut, size_bytes: u64, flags: u16, no_zeroes: bool) {
    out.put_u64(size_bytes);
    out.put_u16(flags);
    if !no_zeroes {
        out.put_bytes(0, EXPORT_NAME_PADDING_BYTES);
    }
}

// ------------------------------------------------------------- transmission

/// What a request asks for.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    WriteZeroes,
    /// A command type we do not implement (CACHE, BLOCK_STATUS, RESIZE, ...).
    Other(u16),
}

impl Command {
    fn from_wire(t: u16) -> Command {
        match t {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            t => Command::Other(t),
        }
    }
}

/// One transmission request. A WRITE's payload follows the header in the
/// buffer: bytes `REQUEST_HEADER_BYTES..consumed`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    /// The client's cookie, echoed in the reply; replies may come in any order.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }
    pub fn no_hole(&self) -> bool {
        self.flags & CMD_FLAG_NO_HOLE != 0
    }
}

/// The header of the request at the head of `buf`, which holds at least
/// [`REQUEST_HEADER_BYTES`], whatever of its data has arrived.
pub fn parse_request_header(buf: &[u8]) -> Result<Request, ProtoError> {
    let magic = be_u32(buf);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::RequestMagic(magic));
    }
    Ok(Request {
        flags: be_u16(&buf[4..]),
        command: Command::from_wire(be_u16(&buf[6..])),
        handle: be_u64(&buf[8..]),
        offset: be_u64(&buf[16..]),
        length: be_u32(&buf[24..]),
    })
}

/// Parses one request and, for a WRITE, waits for its whole payload.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, ProtoError> {
    if buf.len() < REQUEST_HEADER_BYTES {
        return Ok(None);
    }
    let request = parse_request_header(buf)?;
    let payload = match request.command {
        Command::Write => {
            if request.length as usize > REQUEST_BYTES_MAX {
                // Skipping that much would mean buffering it: refuse instead.
                return Err(ProtoError::WriteTooLong {
                    len: request.length,
                });
            }
            request.length as usize
        }
        _ => 0,
    };
    let total = REQUEST_HEADER_BYTES + payload;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some((request, total)))
}

/// How many more bytes `buf` needs before [`parse_request`] can say more
/// than "not yet": the rest of the header, or of a WRITE's payload. At
/// least 1.
pub fn request_bytes_missing(buf: &[u8]) -> usize {
    let total = if buf.len() < REQUEST_HEADER_BYTES {
        REQUEST_HEADER_BYTES
    } else {
        match Command::from_wire(be_u16(&buf[6..])) {
            Command::Write => {
                REQUEST_HEADER_BYTES + (be_u32(&buf[24..]) as usize).min(REQUEST_BYTES_MAX)
            }
            _ => REQUEST_HEADER_BYTES,
        }
    };
    total.saturating_sub(buf.len()).max(1)
}

/// Checks a request against the export before it is carried out: the error
/// to reply with, or `Ok`. The stream stays in sync either way.
pub fn check_request(req: &Request, export_bytes: u64) -> Result<(), u32> {
    if req.flags & !CMD_FLAGS_KNOWN != 0 {
        return Err(EINVAL);
    }
    match req.command {
        Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => {
            if matches!(req.command, Command::Read) && req.length as usize > REQUEST_BYTES_MAX {
                return Err(EOVERFLOW);
            }
            let end = req.offset.checked_add(u64::from(req.length));
            match end {
                Some(end) if end <= export_bytes => Ok(()),
                // The protocol asks for ENOSPC when a write runs past the end.
                _ if matches!(req.command, Command::Write | Command::WriteZeroes) => Err(ENOSPC),
                _ => Err(EINVAL),
            }
        }
        Command::Flush | Command::Disc => {
            if req.offset != 0 || req.length != 0 {
                Err(EINVAL)
            } else {
                Ok(())
            }
        }
        Command::Other(_) => Err(EINVAL),
    }
}

/// A simple reply header; a successful READ's data follows it.
pub fn encode_simple_reply(out: &mut [u8; SIMPLE_REPLY_HEADER_BYTES], error: u32, handle: u64) {
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&handle.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    fn request(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn client_flags_need_fixed_newstyle_and_nothing_unknown() {
        assert_eq!(parse_client_flags(&[0, 0, 0]), Ok(None));
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 3]),
            Ok(Some((ClientFlags { no_zeroes: true }, 4)))
        );
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 0]),
            Err(ProtoError::NotFixedNewstyle(0))
        );
        assert_eq!(
            parse_client_flags(&[0, 0, 0, 5]),
            Err(ProtoError::UnknownClientFlags(5))
        );
    }

    #[test]
    fn go_is_parsed_with_its_info_requests_and_waits_for_all_bytes() {
        let bytes = option(OPT_GO, &info_data("swap0", &[INFO_BLOCK_SIZE]));
        for cut in 0..bytes.len() {
            assert_eq!(parse_option(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let (req, used) = parse_option(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(
            req,
            OptionRequest::Go(InfoRequest {
                name: "swap0".into(),
                requests: vec![INFO_BLOCK_SIZE]
            })
        );
    }

    #[test]
    fn malformed_option_data_is_a_value_not_a_broken_stream() {
        let mut data = info_data("x", &[1, 2]);
        data.pop();
        let (req, _) = parse_option(&option(OPT_INFO, &data)).unwrap().unwrap();
        assert!(matches!(
            req,
            OptionRequest::Malformed {
                option: OPT_INFO,
                ..
            }
        ));
        let (req, _) = parse_option(&option(OPT_LIST, b"junk")).unwrap().unwrap();
        assert!(matches!(
            req,
            OptionRequest::Malformed {
                option: OPT_LIST,
                ..
            }
        ));
        let (req, _) = parse_option(&option(OPT_STARTTLS, &[])).unwrap().unwrap();
        assert_eq!(
            req,
            OptionRequest::Unsupported {
                option: OPT_STARTTLS
            }
        );
    }

    #[test]
    fn bad_magic_and_huge_options_break_the_stream() {
        let mut bytes = option(OPT_LIST, &[]);
        bytes[0] ^= 1;
        assert!(matches!(
            parse_option(&bytes),
            Err(ProtoError::OptionMagic(_))
        ));
        let mut bytes = option(OPT_GO, &[]);
        bytes[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            parse_option(&bytes),
            Err(ProtoError::OptionTooLong { .. })
        ));
    }

    #[test]
    fn write_waits_for_its_payload() {
        let mut bytes = request(CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 10);
        assert_eq!(parse_request(&bytes), Ok(None));
        bytes.extend_from_slice(&[1; 10]);
        let (req, used) = parse_request(&bytes).unwrap().unwrap();
        assert_eq!(used, REQUEST_HEADER_BYTES + 10);
        assert!(req.fua());
        assert_eq!(
            (req.command, req.handle, req.offset),
            (Command::Write, 7, 4096)
        );
        let big = request(0, CMD_WRITE, 1, 0, REQUEST_BYTES_MAX as u32 + 1);
        assert!(matches!(
            parse_request(&big),
            Err(ProtoError::WriteTooLong { .. })
        ));
    }

    #[test]
    fn requests_are_checked_against_the_export() {
        let req = |cmd, flags, off, len| {
            parse_request(&request(flags, cmd, 1, off, len))
                .unwrap()
                .map(|(r, _)| r)
                .unwrap_or(Request {
                    flags,
                    command: Command::Write,
                    handle: 1,
                    offset: off,
                    length: len,
                })
        };
        assert_eq!(check_request(&req(CMD_READ, 0, 0, 8192), 8192), Ok(()));
        assert_eq!(check_request(&req(CMD_READ, 0, 1, 8192), 8192), Err(EINVAL));
        assert_eq!(
            check_request(&req(CMD_READ, 0, u64::MAX, 2), 8192),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_TRIM, 0, 4096, 4097), 8192),
            Err(EINVAL)
        );
        assert_eq!(
            check_request(&req(CMD_WRITE_ZEROES, 0, 8192, 1), 8192),
            Err(ENOSPC)
        );
        assert_eq!(
            check_request(&req(CMD_READ, 1 << 7, 0, 1), 8192),
            Err(EINVAL)
        );
        assert_eq!(check_request(&req(5, 0, 0, 1), 8192), Err(EINVAL));
        assert_eq!(check_request(&req(CMD_FLUSH, 0, 0, 0), 8192), Ok(()));
        assert_eq!(
            check_request(&req(CMD_READ, 0, 0, REQUEST_BYTES_MAX as u32 + 1), u64::MAX),
            Err(EOVERFLOW)
        );
    }

    /// Feeds a whole stream of options or requests through a parser the way
    /// the server does; returns how far it got.
    fn drain<T>(
        mut buf: &[u8],
        parse: impl Fn(&[u8]) -> Result<Option<(T, usize)>, ProtoError>,
    ) -> usize {
        let start = buf.len();
        // Each step consumes at least one byte, so this is bounded.
        for _ in 0..=start {
            match parse(buf) {
                Ok(Some((_, used))) => {
                    assert!(used > 0 && used <= buf.len());
                    buf = &buf[used..];
                }
                Ok(None) | Err(_) => break,
            }
        }
        start - buf.len()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_bytes_never_panic_the_parsers(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_client_flags(&bytes);
            drain(&bytes, parse_option);
            drain(&bytes, parse_request);
            if let Ok(Some((req, _))) = parse_request(&bytes) {
                let _ = check_request(&req, 1 << 30);
            }
        }

        #[test]
        fn an_incomplete_request_lacks_exactly_what_completes_it(
            cmd in 0u16..10,
            len in 0u32..20_000,
            cut_at in any::<proptest::sample::Index>(),
        ) {
            let mut r = request(0, cmd, 9, 0, len);
            if cmd == CMD_WRITE {
                r.resize(r.len() + len as usize, 0xa5);
            }
            let cut = cut_at.index(r.len());
            prop_assert_eq!(parse_request(&r[..cut]), Ok(None));
            let missing = request_bytes_missing(&r[..cut]);
            // The header comes first; once it is in, the rest of the payload.
            let expect = if cut < REQUEST_HEADER_BYTES {
                REQUEST_HEADER_BYTES - cut
            } else {
                r.len() - cut
            };
            prop_assert_eq!(missing, expect);
        }

        #[test]
        fn random_payloads_behind_valid_headers_never_panic(
            opt in 0u32..12,
            data in proptest::collection::vec(any::<u8>(), 0..300),
            cmd in 0u16..10,
            flags in any::<u16>(),
            offset in any::<u64>(),
            len in 0u32..2048,
        ) {
            drain(&option(opt, &data), parse_option);
            let mut r = request(flags, cmd, 9, offset, len);
            r.extend_from_slice(&data);
            if let Ok(Some((req, used))) = parse_request(&r) {
                prop_assert!(used <= r.len());
                let _ = check_request(&req, 1 << 40);
            }
        }
    }
}
