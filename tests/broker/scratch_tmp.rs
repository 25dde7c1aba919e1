use std::sync::{Arc, Mutex};
use fe2o3_amqp::{Connection, Receiver, Session};
use crate::harness::BrokerProcess;

type Log = Arc<Mutex<Vec<String>>>;

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, tag: &'static str, log: Log) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut header_done = false;
    let mut chunk = vec![0u8; 65536];
    loop {
        let n = match from.read(&mut chunk).await { Ok(0) | Err(_) => { log.lock().unwrap().push(format!("{tag} EOF")); let _ = to.shutdown().await; return }, Ok(n) => n };
        to.write_all(&chunk[..n]).await.ok();
        buf.extend_from_slice(&chunk[..n]);
        loop {
            if !header_done { if buf.len() >= 8 { buf.drain(..8); header_done = true; } else { break } }
            if buf.len() < 4 { break }
            let size = u32::from_be_bytes([buf[0],buf[1],buf[2],buf[3]]) as usize;
            if buf.len() < size { break }
            let frame: Vec<u8> = buf.drain(..size).collect();
            let doff = frame[4] as usize * 4;
            if frame.len() == doff { continue }
            let p: Result<fe2o3_amqp::types::performatives::Performative, _> = serde_amqp::from_slice(&frame[doff..]);
            let line = match p { Ok(p) => format!("{tag} {p:?}"), Err(_) => format!("{tag} (transfer)") };
            log.lock().unwrap().push(line.chars().take(260).collect());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scratch_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let broker = BrokerProcess::start(dir.path(), &["--auto-create", "false"]);
    for round in 0..40 {
        let log: Log = Arc::default();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let target = broker.amqp;
        let log2 = log.clone();
        tokio::spawn(async move {
            let (c, _) = l.accept().await.unwrap();
            let b = tokio::net::TcpStream::connect(target).await.unwrap();
            let (cr, cw) = c.into_split();
            let (br, bw) = b.into_split();
            tokio::spawn(pump(cr, bw, "C->B", log2.clone()));
            tokio::spawn(pump(br, cw, "B->C", log2));
        });
        let mut conn = Connection::open("x", format!("amqp://{addr}").as_str()).await.unwrap();
        let mut session = Session::begin(&mut conn).await.unwrap();
        let r1 = Receiver::attach(&mut session, "r1", "unknown").await;
        let r2 = Receiver::attach(&mut session, "r2", "unknown2").await;
        let bad = !matches!(r1, Err(fe2o3_amqp::link::ReceiverAttachError::RemoteClosedWithError(_))) || !matches!(r2, Err(fe2o3_amqp::link::ReceiverAttachError::RemoteClosedWithError(_)));
        if bad {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            eprintln!("round {round}: r1 {r1:?}\n r2 {r2:?}");
            for l in log.lock().unwrap().iter() { eprintln!("{l}"); }
            panic!("reproduced");
        }
        let _ = conn.close().await;
    }
}
