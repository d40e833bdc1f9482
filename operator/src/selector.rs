//! Kubernetes label selectors, checked and matched without an API server (root-namespace
//! policies select namespaces and Services with them).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Why a selector is invalid, worded like the API server's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("matchExpressions[{index}]: {problem}")]
pub struct InvalidSelector {
    pub index: usize,
    pub problem: String,
}

/// Checks the rules the API server applies to a LabelSelector's expressions.
pub fn check(selector: &LabelSelector) -> Result<(), InvalidSelector> {
    for (index, expr) in selector.match_expressions.iter().flatten().enumerate() {
        let has_values = expr.values.as_ref().is_some_and(|v| !v.is_empty());
        let problem = match expr.operator.as_str() {
            "In" | "NotIn" if !has_values => format!("operator {} needs at least one value", expr.operator),
            "Exists" | "DoesNotExist" if has_values => format!("operator {} takes no values", expr.operator),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => continue,
            other => format!("unknown operator {other:?}: use In, NotIn, Exists or DoesNotExist"),
        };
        return Err(InvalidSelector { index, problem });
    }
    Ok(())
}

/// Whether `labels` satisfy the selector. An empty selector matches everything; call
/// [`check`] first, as an invalid expression matches nothing.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match =
        selector.match_labels.iter().flatten().all(|(key, value)| labels.get(key) == Some(value));
    labels_match
        && selector.match_expressions.iter().flatten().all(|expr| {
            let values = expr.values.as_deref().unwrap_or_default();
            let value = labels.get(&expr.key);
            match expr.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(matches(&LabelSelector::default(), &labels(&[])));
        assert!(matches(&LabelSelector::default(), &labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_and_expressions() {
        let selector = LabelSelector {
            match_labels: Some(labels(&[("tier", "app")])),
            match_expressions: Some(vec![
                expr("env", "In", &["prod", "staging"]),
                expr("legacy", "DoesNotExist", &[]),
                expr("team", "NotIn", &["sandbox"]),
            ]),
        };
        assert!(matches(&selector, &labels(&[("tier", "app"), ("env", "prod")])));
        assert!(!matches(&selector, &labels(&[("tier", "app"), ("env", "dev")])));
        assert!(!matches(&selector, &labels(&[("env", "prod")])));
        assert!(!matches(&selector, &labels(&[("tier", "app"), ("env", "prod"), ("legacy", "1")])));
        assert!(!matches(&selector, &labels(&[("tier", "app"), ("env", "prod"), ("team", "sandbox")])));
    }

    #[test]
    fn invalid_expressions_are_named() {
        let bad = |e| LabelSelector { match_expressions: Some(vec![e]), ..Default::default() };
        assert!(check(&bad(expr("a", "In", &[]))).unwrap_err().problem.contains("needs at least one value"));
        assert!(check(&bad(expr("a", "Exists", &["x"]))).unwrap_err().problem.contains("takes no values"));
        assert!(check(&bad(expr("a", "Equals", &["x"]))).unwrap_err().problem.contains("unknown operator"));
        assert!(check(&bad(expr("a", "Exists", &[]))).is_ok());
    }
}
