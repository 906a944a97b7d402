//! The OpenAPI 3.1 document, generated from the handlers' annotations (utoipa), served at
//! `/v1/openapi.json`.

use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Cella", description = "Compliance scans in one-tenant microVMs. Tenants authenticate with `Authorization: Bearer cella_…`; operators with the admin credential. Errors are RFC 9457 problem documents."),
    paths(
        super::healthz, super::metrics,
        super::baselines::create, super::baselines::list, super::baselines::show, super::baselines::delete,
        super::jobs::submit, super::jobs::list, super::jobs::get_job, super::jobs::sarif, super::jobs::summary, super::jobs::cancel,
        super::sessions::create, super::sessions::list, super::sessions::get_session, super::sessions::pause,
        super::sessions::suspend, super::sessions::resume, super::sessions::connect, super::sessions::exec,
        super::sessions::add_file, super::sessions::terminate,
        super::audit::tenant_export, super::audit::keys,
        super::admin::create_tenant, super::admin::list_tenants, super::admin::suspend, super::admin::reinstate,
        super::admin::create_key, super::admin::rotate_keys, super::admin::revoke_all_keys, super::admin::revoke_key,
        super::admin::list_workers, super::admin::drain, super::admin::undrain, super::admin::list_vms,
        super::admin::cancel_job, super::admin::audit_export, super::admin::get_quotas, super::admin::set_quotas,
        super::admin::list_keys,
        super::packs::create, super::packs::list, super::packs::history, super::packs::get_version,
        super::packs::delete_pack, super::packs::delete_version, super::packs::get_default, super::packs::set_default,
        super::packs::check_policy, super::packs::get_license_policy, super::packs::set_license_policy,
    ),
    modifiers(&Security, &Limits, &OperationIds),
    tags((name = "jobs", description = "Scan jobs"), (name = "sessions", description = "Long-lived session VMs: pause, suspend, resume, connect, exec, terminate (at most 8 h)"), (name = "baselines", description = "Known findings a job's scan suppresses, so a gate fails only on new ones"), (name = "audit", description = "The tenant's audit log and the public keys that sign it"),
         (name = "packs", description = "The tenant's own rule packs (Cella TOML or gitleaks configurations), versioned, and its default policy"),
         (name = "admin", description = "Operators"), (name = "service", description = "Health"))
)]
pub struct ApiDoc;

#[derive(Debug)]
struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |desc: &str| {
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(desc)).build(),
            )
        };
        components.add_security_scheme("api_key", bearer("A tenant's API key (cella_…)"));
        components.add_security_scheme("admin", bearer("The operator credential (cella_admin_…)"));
    }
}

/// The answers every operation may give when a limit is reached: `429` (a tenant's requests or
/// uploads in flight, a session's call rate) and `503` (the server's connection limit, the
/// database away), both with `Retry-After`.
#[derive(Debug)]
struct Limits;

impl Modify for Limits {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, ResponseBuilder};
        let problem = |desc: &str| {
            RefOr::T(
                ResponseBuilder::new()
                    .description(desc)
                    .content("application/problem+json", utoipa::openapi::ContentBuilder::new().build())
                    .header(
                        "Retry-After",
                        utoipa::openapi::HeaderBuilder::new()
                            .schema(
                                utoipa::openapi::ObjectBuilder::new()
                                    .schema_type(utoipa::openapi::Type::Integer),
                            )
                            .description(Some("Seconds to wait before trying again"))
                            .build(),
                    )
                    .build(),
            )
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch]
                .into_iter()
                .flatten()
            {
                let tenant = op
                    .security
                    .iter()
                    .flatten()
                    .any(|s| serde_json::to_value(s).is_ok_and(|v| v.get("api_key").is_some()));
                let responses = &mut op.responses.responses;
                if tenant {
                    responses.entry("429".into()).or_insert_with(|| {
                        problem("Too many of this tenant's requests or uploads in flight, or calls to this session: wait for `Retry-After` seconds")
                    });
                }
                responses.entry("503".into()).or_insert_with(|| {
                    problem("The server is at its connection limit or its database is away: try again after `Retry-After` seconds")
                });
            }
        }
    }
}

/// Operation ids unique across the document, as client generators need them: each handler's
/// name under its tag (`jobs_list`, `sessions_list`, `admin_suspend`, …).
#[derive(Debug)]
struct OperationIds;

impl Modify for OperationIds {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch]
                .into_iter()
                .flatten()
            {
                let tag = op.tags.as_ref().and_then(|t| t.first()).cloned().unwrap_or_default();
                if let Some(id) = &op.operation_id {
                    if !tag.is_empty() && !id.starts_with(&format!("{tag}_")) {
                        op.operation_id = Some(format!("{tag}_{id}"));
                    }
                }
            }
        }
    }
}

/// The document as JSON.
pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

pub async fn serve() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], document()).into_response()
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    #[test]
    fn every_operation_has_an_id_of_its_own() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let mut seen = HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no id"));
                assert!(seen.insert(id.to_owned()), "{id} is used twice (again by {method} {path})");
            }
        }
        assert!(
            seen.contains("jobs_list") && seen.contains("sessions_list") && seen.contains("admin_suspend")
        );
    }
}
