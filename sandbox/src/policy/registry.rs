//! Loaded policies by name, for embedders that evaluate without the daemon,
//! and the WASI groups a module's imports would need (`sandgate inspect`).

use std::collections::BTreeMap;

use crate::config::PolicySpec;
use crate::engine::Engine;
use crate::wasi::{self};

use super::{LoadError, Policy};

/// The loaded policies, by name.
#[derive(Clone, Default)]
pub struct Registry {
    policies: BTreeMap<String, Policy>,
}

impl Registry {
    /// Loads every policy of the config; the first failure is returned.
    pub async fn load(engine: &Engine, specs: &[PolicySpec]) -> Result<Registry, LoadError> {
        let mut policies = BTreeMap::new();
        for spec in specs {
            let policy = Policy::load(engine, spec.clone()).await?;
            policies.insert(spec.name.clone(), policy);
        }
        Ok(Registry { policies })
    }

    pub fn get(&self, name: &str) -> Option<&Policy> {
        self.policies.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.policies.values()
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

/// Which group grants a WASI function, for `inspect`.
pub fn needed_groups(wasi_imports: &[String]) -> Vec<&'static str> {
    let mut groups: Vec<&'static str> = wasi_imports
        .iter()
        .filter_map(|f| wasi::group_of(f))
        .collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}
