//! Resolves `[engine]`: cache and download directories, pool limits and
//! module fetching.

use std::time::Duration;

use super::{Resolver, SpannedU32};
use crate::config::raw::RawEngine;
use crate::config::{ConfigError, DOWNLOADS_SUBDIR, EngineSettings};

impl Resolver<'_> {
    pub(super) fn engine(&self, raw: Option<RawEngine>) -> Result<EngineSettings, ConfigError> {
        let mut settings = EngineSettings::default();
        let Some(raw) = raw else {
            return Ok(settings);
        };
        if let Some(dir) = &raw.cache_dir {
            let dir = self.relative(dir.get_ref());
            settings.download_dir = Some(dir.join(DOWNLOADS_SUBDIR));
            settings.cache_dir = Some(dir);
        }
        // Only compiled modules: downloads are still kept, so a start
        // without network can use them.
        if raw.cache == Some(false) {
            settings.cache_dir = None;
        }
        settings.allow_insecure_http = raw.allow_insecure_http.unwrap_or(false);
        if let Some(ms) = &raw.fetch_timeout_ms {
            settings.fetch_timeout =
                Duration::from_millis(self.ranged("engine.fetch_timeout_ms", ms, 1, 600_000)?);
        }
        if let Some(mb) = &raw.max_module_mb {
            settings.max_module_bytes = self.ranged("engine.max_module_mb", mb, 1, 1024)? << 20;
        }
        if let Some(mb) = raw.max_memory_mb {
            settings.max_memory_bytes = self.ranged("engine.max_memory_mb", &mb, 1, 4096)? << 20;
        }
        if let Some(n) = raw.max_instances {
            settings.max_instances =
                self.ranged("engine.max_instances", &n.map_u64(), 1, 100_000)? as u32;
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::assert_all_refused;

    #[test]
    fn engine_limits_out_of_range_name_key_and_line() {
        assert_all_refused(&[
            (
                "[engine]\nfetch_timeout_ms = 0\n",
                Some(2),
                "engine.fetch_timeout_ms",
                "0 is out of range (allowed 1..=600000)",
            ),
            (
                "[engine]\nmax_module_mb = 1025\n",
                Some(2),
                "engine.max_module_mb",
                "1025 is out of range (allowed 1..=1024)",
            ),
            (
                "[engine]\nmax_memory_mb = 4097\n",
                Some(2),
                "engine.max_memory_mb",
                "4097 is out of range (allowed 1..=4096)",
            ),
            (
                "[engine]\nmax_instances = 0\n",
                Some(2),
                "engine.max_instances",
                "0 is out of range (allowed 1..=100000)",
            ),
        ]);
    }
}
