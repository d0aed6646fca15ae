//! What the host does with bytes a guest hands back: the decision document
//! of `sandgate_evaluate`, the HttpRequest document of `http_send`, and the
//! packed `(ptr, len)` result checked against the guest's memory size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandgate::abi::call::unpack;
use sandgate::abi::memory::checked_range;
use sandgate::bridge::decode_request;
use sandgate::config::EgressRule;
use sandgate::decision::Decision;

fuzz_target!(|data: &[u8]| {
    if let Ok(decision) = Decision::from_guest(data) {
        assert!(decision.error.is_none(), "a guest set the host's error");
        if let Some(status) = decision.status {
            assert!((100..=599).contains(&status), "status {status} accepted");
        }
        // What the host renders back reads as the same decision.
        let rendered = serde_json::to_vec(&decision).expect("a decision serialises");
        assert_eq!(Decision::from_guest(&rendered).as_ref(), Ok(&decision));
    }

    if let Ok(request) = decode_request(data)
        && let Ok(url) = url::Url::parse(&request.url)
    {
        let rule = EgressRule::parse("http://127.0.0.1:8080/introspect").expect("a valid rule");
        if rule.matches(&url) {
            assert_eq!(url.host_str(), Some("127.0.0.1"), "{url} matched");
            assert_eq!(url.port_or_known_default(), Some(8080), "{url} matched");
        }
    }

    if let Some((packed, size)) = data.split_first_chunk::<8>().and_then(|(packed, rest)| {
        let size = rest.first_chunk::<4>()?;
        Some((
            i64::from_le_bytes(*packed),
            u32::from_le_bytes(*size) as usize,
        ))
    }) {
        let (ptr, len) = unpack(packed);
        assert_eq!((i64::from(ptr) << 32) | i64::from(len), packed);
        if let Ok(range) = checked_range(size, ptr, len) {
            assert!(
                range.end <= size && range.len() == len as usize && range.start == ptr as usize
            );
        }
    }
});
