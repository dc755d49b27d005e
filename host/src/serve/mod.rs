//! `lorahost serve`: the model behind HTTP, so outside harnesses (lm-evaluation-harness's
//! `local-completions`, HELM's 2023 challenge client) can score it. [`http`] reads and writes the bytes within
//! limits; [`api`] holds the endpoints. A bad request gets a 4xx JSON error and never takes the server down:
//! each connection runs on its own thread, a panic in one is caught, and at most `max_connections` are open.
pub mod api;
pub mod http;

use api::Api;
use http::{error_body, read_request, write_json, HttpError, Limits};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Connections handled at once; more get 503 at once.
pub const MAX_CONNECTIONS: usize = 32;

/// Answers one connection.
fn handle(api: &Api, limits: &Limits, stream: &TcpStream) {
    let reply = match read_request(stream, limits) {
        Err(e) => Err(e),
        Ok(req) => {
            let route = |f: &dyn Fn(&[u8]) -> Result<serde_json::Value, HttpError>| {
                if req.method != "POST" {
                    return Err(HttpError::new(405, format!("{} {}: use POST", req.method, req.path)));
                }
                // A panic inside the model or the tokenizer costs this request only.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&req.body)))
                    .unwrap_or_else(|_| Err(HttpError::new(500, "internal error while answering this request")))
            };
            match req.path.as_str() {
                "/v1/completions" => route(&|b| api.completions(b)),
                "/process" => route(&|b| api.process(b)),
                "/tokenize" => route(&|b| api.tokenize(b)),
                "/decode" => route(&|b| api.decode(b)),
                other => Err(HttpError::new(404, format!("no endpoint {other}: use /v1/completions, /process, /tokenize or /decode"))),
            }
        }
    };
    match reply {
        Ok(v) => write_json(stream, 200, &v),
        Err(e) => write_json(stream, e.status, &error_body(&e)),
    }
}

/// Serves `listener` until `stop` is set (checked after each accepted connection).
pub fn serve(listener: &TcpListener, api: &Api, limits: &Limits, stop: &AtomicBool) {
    let open = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for stream in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else { continue };
            if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                open.fetch_sub(1, Ordering::SeqCst);
                write_json(&stream, 503, &error_body(&HttpError::new(503, "too many open connections; retry")));
                continue;
            }
            let open = &open;
            scope.spawn(move || {
                handle(api, limits, &stream);
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
}
