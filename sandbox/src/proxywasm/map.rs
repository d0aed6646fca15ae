//! The proxy-wasm 0.2.x wire forms the host reads and writes: header maps
//! (`u32` count, `u32` key/value lengths, then each key and value followed by
//! a NUL byte) and property paths (segments separated by NUL). Pure
//! functions over bytes the host already copied out of guest memory.

/// Encodes `pairs` as a proxy-wasm header map.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let size = 4 + pairs
        .iter()
        .map(|(k, v)| k.len() + v.len() + 10)
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes a header map a filter handed the host; the error says where it
/// is malformed. An empty buffer is an empty map.
pub fn decode(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let word = |at: usize| -> Result<usize, String> {
        bytes
            .get(at..at + 4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize)
            .ok_or_else(|| {
                format!(
                    "header map of {} bytes ends inside its size table",
                    bytes.len()
                )
            })
    };
    let count = word(0)?;
    let table_end = count
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .filter(|&end| end <= bytes.len())
        .ok_or_else(|| {
            format!(
                "header map claims {count} pairs but is only {} bytes",
                bytes.len()
            )
        })?;
    let mut pairs = Vec::with_capacity(count);
    let mut at = table_end;
    let mut take = |len: usize| -> Result<String, String> {
        let end = at
            .checked_add(len)
            .filter(|&end| end < bytes.len())
            .ok_or_else(|| format!("header map entry of {len} bytes runs past its end"))?;
        let text = String::from_utf8_lossy(&bytes[at..end]).into_owned();
        at = end + 1;
        Ok(text)
    };
    for i in 0..count {
        let (klen, vlen) = (word(4 + i * 8)?, word(8 + i * 8)?);
        let key = take(klen)?;
        let value = take(vlen)?;
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Splits a property path into its segments.
pub fn path(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_maps_round_trip_and_bad_ones_are_refused() {
        let pairs = vec![
            (":path".to_owned(), "/a?b=1".to_owned()),
            ("x-api-key".to_owned(), String::new()),
        ];
        assert_eq!(decode(&encode(&pairs)).ok(), Some(pairs.clone()));
        assert_eq!(decode(&[]).ok(), Some(Vec::new()));
        let mut cut = encode(&pairs);
        cut.truncate(cut.len() - 1);
        assert!(decode(&cut).is_err());
        assert!(decode(&u32::MAX.to_le_bytes()).is_err());
        let mut lying = encode(&pairs);
        lying[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(decode(&lying).is_err());
    }

    #[test]
    fn property_paths_split_on_nul() {
        assert_eq!(path(b"request\0path"), vec!["request", "path"]);
        assert_eq!(path(b"plugin_name"), vec!["plugin_name"]);
    }
}
