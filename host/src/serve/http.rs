//! A deliberately small HTTP/1.1 server side: one request per connection (`Connection: close`), bodies by
//! `Content-Length` only, JSON in and out. Every limit is checked before the bytes are held, so a client can
//! neither make the server allocate without bound nor keep a thread forever (socket timeouts).
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// The bounds on one request.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Request line and headers together.
    pub max_header_bytes: usize,
    pub max_body_bytes: usize,
    /// How long a client may take to send its request (and to read the reply).
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_header_bytes: 16 * 1024, max_body_bytes: 1024 * 1024, timeout: Duration::from_secs(10) }
    }
}

/// A parsed request.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// Without the query string.
    pub path: String,
    pub body: Vec<u8>,
}

/// A request that cannot be served, as the status and message to answer with.
#[derive(Debug, PartialEq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError { status, message: message.into() }
    }
}

/// Reads one request from `stream` within `limits`.
pub fn read_request(stream: &TcpStream, limits: &Limits) -> Result<Request, HttpError> {
    stream.set_read_timeout(Some(limits.timeout)).ok();
    stream.set_write_timeout(Some(limits.timeout)).ok();
    let mut reader = BufReader::new(stream.take((limits.max_header_bytes + limits.max_body_bytes + 1) as u64));
    let mut head_bytes = 0usize;
    let mut line = String::new();
    let mut read_line = |reader: &mut BufReader<_>, line: &mut String| -> Result<(), HttpError> {
        line.clear();
        // A line may not run past what is left of the header budget.
        let budget = (limits.max_header_bytes - head_bytes.min(limits.max_header_bytes)) as u64 + 1;
        let n = Read::take(reader, budget).read_line(line).map_err(io_error)?;
        head_bytes += n;
        if head_bytes > limits.max_header_bytes {
            return Err(HttpError::new(431, format!("the request line and headers exceed {} bytes", limits.max_header_bytes)));
        }
        if n == 0 {
            return Err(HttpError::new(400, "the connection closed before the request was complete"));
        }
        Ok(())
    };
    read_line(&mut reader, &mut line)?;
    let mut parts = line.trim_end().split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(HttpError::new(400, "malformed request line (expected `METHOD /path HTTP/1.1`)"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::new(505, format!("{version} is not supported; use HTTP/1.1")));
    }
    let (method, path) = (method.to_string(), target.split('?').next().unwrap_or("").to_string());
    let mut length: Option<usize> = None;
    loop {
        read_line(&mut reader, &mut line)?;
        let h = line.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            return Err(HttpError::new(400, format!("malformed header line {h:?}")));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            let n: usize = value.parse().map_err(|_| HttpError::new(400, format!("Content-Length {value:?} is not a number")))?;
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::new(400, "two different Content-Length headers"));
            }
            length = Some(n);
        } else if name == "transfer-encoding" {
            return Err(HttpError::new(501, "Transfer-Encoding is not supported: send a Content-Length"));
        }
    }
    let length = length.unwrap_or(0);
    if length > limits.max_body_bytes {
        return Err(HttpError::new(413, format!("the body is {length} bytes, more than the {} allowed", limits.max_body_bytes)));
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).map_err(io_error)?;
    Ok(Request { method, path, body })
}

fn io_error(e: std::io::Error) -> HttpError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => HttpError::new(408, "the request took too long to arrive"),
        std::io::ErrorKind::UnexpectedEof => HttpError::new(400, "the body is shorter than its Content-Length"),
        _ => HttpError::new(400, format!("cannot read the request: {e}")),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

/// Writes a JSON reply and closes the exchange; a client that went away is not an error of ours.
pub fn write_json(mut stream: &TcpStream, status: u16, body: &serde_json::Value) {
    let body = serde_json::to_vec(body).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(&body)).and_then(|_| stream.flush());
}

/// The JSON error body, in the OpenAI shape (`{"error": {"message", "type", "code"}}`).
pub fn error_body(e: &HttpError) -> serde_json::Value {
    let kind = if e.status >= 500 { "server_error" } else { "invalid_request_error" };
    serde_json::json!({ "error": { "message": e.message, "type": kind, "code": e.status } })
}
