//! A tiny, bounds-checked DER reader: just enough X.509 to copy the CA's subject name and read a peer's node name.
//!
//! rcgen is built without its `x509-parser` feature and webpki's certificate
//! parser is not public through rustls, so the few fields we need are read
//! here. Every read is checked against the remaining input: malformed or
//! hostile bytes give `None`, never a panic.

/// One DER element: its tag, its content and the whole encoding (header included).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tlv<'a> {
    pub tag: u8,
    pub content: &'a [u8],
    pub raw: &'a [u8],
}

/// Reads consecutive DER elements from a byte slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    pub fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// The next element, or `None` at the end or on malformed input.
    pub fn next_tlv(&mut self) -> Option<Tlv<'a>> {
        let tag = *self.rest.first()?;
        if tag & 0x1f == 0x1f {
            // High tag numbers never occur in the fields we read.
            return None;
        }
        let first = *self.rest.get(1)?;
        let (len, header) = if first < 0x80 {
            (usize::from(first), 2usize)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let bytes = self.rest.get(2..2 + n)?;
            let len = bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, 2 + n)
        };
        let end = header.checked_add(len)?;
        let raw = self.rest.get(..end)?;
        let content = raw.get(header..)?;
        self.rest = self.rest.get(end..)?;
        Some(Tlv { tag, content, raw })
    }

    /// The next element if it carries `tag`.
    pub fn expect(&mut self, tag: u8) -> Option<Tlv<'a>> {
        let tlv = self.next_tlv()?;
        (tlv.tag == tag).then_some(tlv)
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
/// id-ce-subjectAltName, 2.5.29.17.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];
/// id-at-commonName, 2.5.4.3.
#[cfg(test)]
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];

/// The parts of a certificate we use.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CertFields<'a> {
    /// The serial number's INTEGER content.
    pub serial: &'a [u8],
    /// The issuer Name, whole encoding.
    pub issuer: Tlv<'a>,
    /// The subject Name, whole encoding.
    pub subject: Tlv<'a>,
    /// The SubjectPublicKeyInfo, whole encoding.
    pub spki: Tlv<'a>,
    /// The content of the extensions SEQUENCE, if any.
    pub extensions: Option<&'a [u8]>,
}

/// Splits an X.509 certificate into the fields of [`CertFields`].
pub(crate) fn cert_fields(der: &[u8]) -> Option<CertFields<'_>> {
    let cert = Reader::new(der).expect(SEQUENCE)?;
    let tbs = Reader::new(cert.content).expect(SEQUENCE)?;
    let mut t = Reader::new(tbs.content);
    if t.peek_tag() == Some(0xa0) {
        t.next_tlv()?; // [0] version
    }
    let serial = t.expect(0x02)?.content;
    t.expect(SEQUENCE)?; // signature algorithm
    let issuer = t.expect(SEQUENCE)?;
    t.expect(SEQUENCE)?; // validity
    let subject = t.expect(SEQUENCE)?;
    let spki = t.expect(SEQUENCE)?;
    let mut extensions = None;
    while let Some(field) = t.next_tlv() {
        if field.tag == 0xa3 {
            extensions = Some(Reader::new(field.content).expect(SEQUENCE)?.content);
        }
    }
    Some(CertFields {
        serial,
        issuer,
        subject,
        spki,
        extensions,
    })
}

/// One attribute of a distinguished name.
#[derive(Debug, Clone)]
pub(crate) struct Attr<'a> {
    pub oid: &'a [u8],
    pub tag: u8,
    pub value: &'a [u8],
}

/// The relative distinguished names of a Name, each a list of attributes.
pub(crate) fn name_rdns(name: &[u8]) -> Option<Vec<Vec<Attr<'_>>>> {
    let seq = Reader::new(name).expect(SEQUENCE)?;
    let mut rdns = Reader::new(seq.content);
    let mut out = Vec::new();
    while let Some(set) = rdns.next_tlv() {
        if set.tag != SET {
            return None;
        }
        let mut attrs = Reader::new(set.content);
        let mut rdn = Vec::new();
        while let Some(atv) = attrs.next_tlv() {
            if atv.tag != SEQUENCE {
                return None;
            }
            let mut r = Reader::new(atv.content);
            let oid = r.expect(OID)?;
            let value = r.next_tlv()?;
            rdn.push(Attr {
                oid: oid.content,
                tag: value.tag,
                value: value.content,
            });
        }
        out.push(rdn);
    }
    Some(out)
}

/// Decodes an OID's content octets into its arcs.
pub(crate) fn oid_arcs(bytes: &[u8]) -> Option<Vec<u64>> {
    let mut values = Vec::new();
    let mut acc: u64 = 0;
    let mut pending = false;
    for b in bytes {
        acc = acc.checked_mul(128)?.checked_add(u64::from(b & 0x7f))?;
        pending = b & 0x80 != 0;
        if !pending {
            values.push(acc);
            acc = 0;
        }
    }
    if pending {
        return None;
    }
    let (&first, rest) = values.split_first()?;
    let (a, b) = match first {
        0..=39 => (0, first),
        40..=79 => (1, first - 40),
        _ => (2, first - 80),
    };
    let mut arcs = vec![a, b];
    arcs.extend_from_slice(rest);
    Some(arcs)
}

/// The DNS names in the certificate's subjectAltName extension.
pub(crate) fn dns_names(der: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let Some(exts) = cert_fields(der).and_then(|f| f.extensions) else {
        return out;
    };
    let mut exts = Reader::new(exts);
    while let Some(ext) = exts.next_tlv() {
        let mut r = Reader::new(ext.content);
        if r.expect(OID).map(|o| o.content) != Some(OID_SAN) {
            continue;
        }
        let mut value = r.next_tlv();
        if value.map(|v| v.tag) == Some(0x01) {
            value = r.next_tlv(); // critical flag
        }
        let Some(value) = value.filter(|v| v.tag == OCTET_STRING) else {
            continue;
        };
        let Some(names) = Reader::new(value.content).expect(SEQUENCE) else {
            continue;
        };
        let mut names = Reader::new(names.content);
        while let Some(name) = names.next_tlv() {
            // dNSName is [2] IMPLICIT IA5String.
            if name.tag == 0x82 {
                if let Ok(s) = std::str::from_utf8(name.content) {
                    out.push(s.to_owned());
                }
            }
        }
    }
    out
}

/// The subject's common name, if it is a text string (tests check what
/// `weft cert issue` writes; a node is named by its SAN only).
#[cfg(test)]
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let fields = cert_fields(der)?;
    name_rdns(fields.subject.raw)?
        .into_iter()
        .flatten()
        .find(|a| a.oid == OID_CN)
        .and_then(|a| std::str::from_utf8(a.value).ok().map(str::to_owned))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decodes_common_oids() {
        assert_eq!(oid_arcs(OID_CN), Some(vec![2, 5, 4, 3]));
        assert_eq!(oid_arcs(OID_SAN), Some(vec![2, 5, 29, 17]));
        // 1.2.840.10045.2.1 (id-ecPublicKey)
        assert_eq!(
            oid_arcs(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01]),
            Some(vec![1, 2, 840, 10045, 2, 1])
        );
        assert_eq!(oid_arcs(&[0x86]), None);
        assert_eq!(oid_arcs(&[]), None);
    }

    #[test]
    fn rejects_truncated_and_oversized_lengths() {
        assert!(Reader::new(&[0x30, 0x05, 0x01]).next_tlv().is_none());
        assert!(Reader::new(&[0x30, 0x85, 1, 1, 1, 1, 1])
            .next_tlv()
            .is_none());
        assert!(Reader::new(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff])
            .next_tlv()
            .is_none());
        assert!(Reader::new(&[0x1f, 0x00]).next_tlv().is_none());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = cert_fields(&bytes);
            let _ = name_rdns(&bytes);
            let _ = oid_arcs(&bytes);
            let _ = dns_names(&bytes);
            let _ = common_name(&bytes);
        }
    }
}
