//! The frame of the REST API's OpenAPI document: its info, server, tags, the `bearer` security
//! scheme and the error responses the operations share. The operations themselves come from the
//! handlers' `#[utoipa::path]` attributes and the schemas from the wire types' `ToSchema`
//! derives, gathered as the routes are registered (`super::router`).

use gantry_api::{ApiError, ErrorCode};
use serde_json::json;
use utoipa::openapi::extensions::Extensions;
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::tag::{Tag, TagBuilder};
use utoipa::openapi::{Components, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, Ref, RefOr, ServerBuilder};
use utoipa::{PartialSchema, ToResponse, ToSchema};

const SUMMARY: &str = "Submit, watch and cancel training jobs on a Gantry node.";

const DESCRIPTION: &str = "The REST API of `gantry daemon`. Errors of every route are JSON in one shape (ApiError) whose \
    `code` fixes the status: `bad_request` 400 (and 405 for a method a route does not serve, 413 for a body over 2 MiB), \
    `unauthorized` 401, `forbidden` 403, `invalid_spec` 422, `not_found` 404 (also for a path that matches no route), \
    `conflict` 409, `unavailable` 503, `internal` 500. On a daemon started with `--tokens`, every `/v1/jobs`, \
    `/v1/devices` and `/v1/whoami` call needs `Authorization: Bearer SECRET` (401 without a valid one, with \
    `WWW-Authenticate: Bearer`); `/healthz`, `/readyz`, `/metrics` and this document stay open. A `user` sees every job \
    but cancels and deletes only its own (403 otherwise); an `admin` acts on any. Query parameters are checked strictly: \
    an unknown, repeated or malformed parameter answers 400. Times are milliseconds since the Unix epoch. The web \
    dashboard's pages (`/`, `/jobs/{id}`, `/queue`, `/devices`, `/submit`, `/ui/{file}`) are served beside the API but \
    are not part of it, so they are not described here.";

/// The document before the routes add their operations and schemas.
pub fn frame() -> OpenApi {
    // utoipa's `Info` has no `summary` (new in OpenAPI 3.1); its extensions are flattened into it
    // as they are, so the field goes there.
    let mut info_fields = Extensions::default();
    info_fields.insert("summary".into(), json!(SUMMARY));
    let info = InfoBuilder::new()
        .title("Gantry daemon API")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(DESCRIPTION))
        .extensions(Some(info_fields))
        .build();
    let mut components = Components::new();
    components.security_schemes.insert(
        "bearer".into(),
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "A secret made by `gantry token new`; the daemon's tokens file holds its SHA-256. Needed only on a daemon \
                     started with `--tokens`.",
                ))
                .build(),
        ),
    );
    components.responses.extend(responses().into_iter().map(|(name, r)| (name.to_string(), r)));
    // The error shape is referenced from the shared responses, which carry no schemas of their own.
    components.schemas.insert(ApiError::name().into_owned(), ApiError::schema());
    let mut schemas = Vec::new();
    <ApiError as ToSchema>::schemas(&mut schemas);
    components.schemas.extend(schemas);
    OpenApiBuilder::new()
        .info(info)
        // Relative: the document is right on whatever address (and scheme) it was fetched from.
        .servers(Some([ServerBuilder::new().url("/").description(Some("the daemon that served this document")).build()]))
        .tags(Some(tags()))
        .components(Some(components))
        .build()
}

fn tags() -> Vec<Tag> {
    [
        ("jobs", "Submit, list, inspect, cancel and delete training jobs; their metrics, events, logs and checkpoints."),
        ("devices", "The node's device slots."),
        ("auth", "Who the caller's token stands for."),
        ("operations", "Health, readiness, Prometheus metrics and this document."),
    ]
    .into_iter()
    .map(|(name, description)| TagBuilder::new().name(name).description(Some(description)).build())
    .collect()
}

/// An error response in the API's shape, with an example.
fn error_response(description: &str, code: ErrorCode, message: &str) -> Response {
    let example = serde_json::to_value(ApiError { code, message: message.into(), field: None }).expect("an error is JSON");
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new().schema(Some(Ref::from_schema_name(ApiError::name()))).example(Some(example)).build(),
        )
        .build()
}

/// The shared error responses, each a `ToResponse` type that operations name as
/// `(status = N, response = Name)`, which refers to `#/components/responses/Name`.
macro_rules! error_responses {
    ($($name:ident: $code:ident, $description:literal, $message:literal;)*) => {
        $(
            pub struct $name;

            impl<'r> ToResponse<'r> for $name {
                fn response() -> (&'r str, RefOr<Response>) {
                    (stringify!($name), error_response($description, ErrorCode::$code, $message).into())
                }
            }
        )*

        /// Every shared response, for the document's components.
        fn responses() -> Vec<(&'static str, RefOr<Response>)> {
            vec![$(<$name as ToResponse>::response()),*]
        }
    };
}

error_responses! {
    BadRequest: BadRequest,
        "`bad_request`: an unknown, repeated or malformed query parameter, or a job id that is not an integer.",
        "the job id must be an integer";
    Unauthorized: Unauthorized,
        "`unauthorized`: the daemon has tokens and the request carries no valid one.",
        "the token is not valid (unknown, or revoked)";
    Forbidden: Forbidden,
        "`forbidden`: the token's user may not act on this job (it belongs to another user, and the caller is not an admin).",
        "alice may not cancel job 7: it belongs to bob (a user acts on its own jobs; an admin on any)";
    NotFound: NotFound,
        "`not_found`: no job has this id.",
        "job 12345 does not exist";
    Conflict: Conflict,
        "`conflict`: the job's state does not allow the request.",
        "job 42 is succeeded; it cannot become cancelled";
    PayloadTooLarge: BadRequest,
        "The body is larger than the 2 MiB the API takes (status 413).",
        "the request body is larger than the 2 MiB the API takes";
    Internal: Internal,
        "`internal`: any other failure (a database or I/O error).",
        "database error: ...";
    Unavailable: Unavailable,
        "`unavailable`: the database cannot be reached for now; retry.",
        "the database is unavailable: pool timed out while waiting for an open connection";
}
