//! A TEST DOUBLE of an OpenAI-compatible completion server (what vLLM offers), for tests of
//! the remote language-model client and of the element's fault behaviour. It runs no model:
//! it answers `/v1/models` with one model, and `/v1/completions` with scripted replies
//! (status, body, delay, a dropped connection), and records every request it was sent.
//!
//! It listens on 127.0.0.1 only, handles each connection on its own thread (so slow replies
//! to one stream do not hold up another), answers with `Connection: close`, and stops when
//! dropped; [`FakeLlmServer::restart`] listens again on the same port, as a server that died
//! and came back.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One scripted answer to a `/v1/completions` request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A completion with these ids (and their text), `finish_reason` "length" or "stop";
    /// with "stop" the stop id 2 is appended as vLLM does.
    Completion {
        token_ids: Vec<u32>,
        finish_reason: &'static str,
    },
    /// Any status and raw body.
    Raw { status: u16, body: String },
    /// Wait, then answer.
    Delayed(Duration, Box<Reply>),
    /// Read the request, then close the connection without a reply.
    Hangup,
}

impl Reply {
    /// A vLLM-shaped error body.
    pub fn error(status: u16, message: &str) -> Self {
        let body = serde_json_escape(message);
        Reply::Raw {
            status,
            body: format!(
                r#"{{"error":{{"message":"{body}","type":"BadRequestError","param":null,"code":{status}}}}}"#
            ),
        }
    }

    pub fn completion(token_ids: &[u32]) -> Self {
        Reply::Completion {
            token_ids: token_ids.to_vec(),
            finish_reason: "length",
        }
    }
}

fn serde_json_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// A request as the double received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub received: Instant,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the request body is JSON")
    }
}

#[derive(Default)]
struct Script {
    replies: VecDeque<Reply>,
    default: Option<Reply>,
    requests: Vec<RecordedRequest>,
    in_flight: usize,
    max_in_flight: usize,
    /// How long `/v1/models` takes to answer.
    models_delay: Duration,
}

struct Shared {
    model: String,
    max_model_len: usize,
    script: Mutex<Script>,
    changed: Condvar,
}

pub struct FakeLlmServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeLlmServer {
    /// Listens on a free port of 127.0.0.1, serving `model`.
    pub fn start(model: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let shared = Arc::new(Shared {
            model: model.to_owned(),
            max_model_len: 512,
            script: Mutex::new(Script::default()),
            changed: Condvar::new(),
        });
        Self::serve(listener, shared)
    }

    fn serve(listener: TcpListener, shared: Arc<Shared>) -> Self {
        let addr = listener.local_addr().expect("local address");
        let mut server = Self {
            addr,
            shared,
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        server.listen(listener);
        server
    }

    fn listen(&mut self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("non-blocking accept");
        let stop = Arc::new(AtomicBool::new(false));
        self.stop = stop.clone();
        let shared = self.shared.clone();
        self.thread = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (shared, stop) = (shared.clone(), stop.clone());
                        std::thread::spawn(move || handle(stream, &shared, &stop));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
        }));
    }

    /// A port on 127.0.0.1 where nothing listens (connections are refused).
    pub fn unused_url() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local address");
        drop(listener);
        format!("http://{addr}")
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening (connections are refused; replies being delayed still go out).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Listens again on the same port, with the same script and records.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("cannot listen on {} again: {e}", self.addr),
            }
        };
        self.listen(listener);
    }

    /// Queues replies for the next completion requests, in order.
    pub fn push_replies(&self, replies: impl IntoIterator<Item = Reply>) {
        let mut script = self.shared.script.lock().unwrap();
        script.replies.extend(replies);
    }

    /// Makes `/v1/models` (the element's start-up probe) answer only after `delay`.
    pub fn set_models_delay(&self, delay: Duration) {
        self.shared.script.lock().unwrap().models_delay = delay;
    }

    /// The reply once the queue is empty (by default a completion of `[5, 6, 7]`).
    pub fn set_default(&self, reply: Reply) {
        self.shared.script.lock().unwrap().default = Some(reply);
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.script.lock().unwrap().requests.clone()
    }

    /// Completion requests only.
    pub fn completions(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == "/v1/completions")
            .collect()
    }

    /// The most completion requests that were ever being answered at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.shared.script.lock().unwrap().max_in_flight
    }

    /// Waits until `count` completion requests have arrived (false on timeout).
    pub fn wait_for_completions(&self, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut script = self.shared.script.lock().unwrap();
        loop {
            let seen = script
                .requests
                .iter()
                .filter(|r| r.path == "/v1/completions")
                .count();
            if seen >= count {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            script = self
                .shared
                .changed
                .wait_timeout(script, deadline - now)
                .unwrap()
                .0;
        }
    }
}

impl Drop for FakeLlmServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_request(stream: &mut TcpStream) -> Option<RecordedRequest> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(RecordedRequest {
        method,
        path,
        headers,
        body,
        received: Instant::now(),
    })
}

fn write_reply(stream: &mut TcpStream, status: u16, body: &str) {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
    let _ = stream.flush();
}

fn completion_json(token_ids: &[u32], finish_reason: &str) -> String {
    let mut ids = token_ids.to_vec();
    if finish_reason == "stop" {
        ids.push(2);
    }
    let list = ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let text = ids
        .iter()
        .map(|id| format!("t{id}"))
        .collect::<Vec<_>>()
        .join(" ");
    format!(
        r#"{{"id":"cmpl-test","object":"text_completion","model":"fake","choices":[{{"index":0,"text":"{text}","finish_reason":"{finish_reason}","stop_reason":null,"token_ids":[{list}]}}]}}"#
    )
}

fn handle(mut stream: TcpStream, shared: &Shared, stop: &AtomicBool) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Some(request) = read_request(&mut stream) else {
        return;
    };
    let path = request.path.clone();
    let is_completion = path == "/v1/completions";
    let (reply, models_delay) = {
        let mut script = shared.script.lock().unwrap();
        script.requests.push(request);
        shared.changed.notify_all();
        let reply = if is_completion {
            script.in_flight += 1;
            script.max_in_flight = script.max_in_flight.max(script.in_flight);
            Some(script.replies.pop_front().unwrap_or_else(|| {
                script
                    .default
                    .clone()
                    .unwrap_or_else(|| Reply::completion(&[5, 6, 7]))
            }))
        } else {
            None
        };
        (reply, script.models_delay)
    };
    match (path.as_str(), reply) {
        ("/health", _) => write_reply(&mut stream, 200, ""),
        ("/v1/models", _) => {
            std::thread::sleep(models_delay);
            write_reply(
                &mut stream,
                200,
                &format!(
                    r#"{{"object":"list","data":[{{"id":"{}","object":"model","max_model_len":{}}}]}}"#,
                    serde_json_escape(&shared.model),
                    shared.max_model_len
                ),
            )
        }
        (_, Some(mut reply)) => {
            loop {
                match reply {
                    Reply::Delayed(delay, next) => {
                        let until = Instant::now() + delay;
                        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        reply = *next;
                    }
                    Reply::Completion {
                        token_ids,
                        finish_reason,
                    } => {
                        write_reply(
                            &mut stream,
                            200,
                            &completion_json(&token_ids, finish_reason),
                        );
                        break;
                    }
                    Reply::Raw { status, body } => {
                        write_reply(&mut stream, status, &body);
                        break;
                    }
                    Reply::Hangup => break,
                }
            }
            let mut script = shared.script.lock().unwrap();
            script.in_flight -= 1;
        }
        _ => write_reply(&mut stream, 404, r#"{"detail":"Not Found"}"#),
    }
}
