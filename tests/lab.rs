//! The shared lab helper builds its namespaces and removes every one on Drop.

use xtask::lab::{self, Lab};

fn namespaces() -> String {
    String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
}

#[test]
fn lab_is_built_and_torn_down() {
    if let Some(why) = lab::missing(&["ping"]) {
        eprintln!("skipping lab_is_built_and_torn_down: {why}");
        return;
    }
    let (server, client) = {
        let mut lab = Lab::new("labt").unwrap();
        let c = lab.add_client(Some("52:54:00:12:34:56")).unwrap();
        assert_eq!(c.mac, "52:54:00:12:34:56");
        lab::ip(["-n", &c.ns, "addr", "add", "10.77.0.9/24", "dev", "eth0"]).unwrap();
        let st = Lab::cmd(&c.ns, "ping")
            .args(["-c", "1", "-W", "5", &lab::SERVER_IP.to_string()])
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "client cannot reach the server over the bridge"
        );
        let tap = lab.add_tap().unwrap();
        assert_eq!(tap, "tap0");
        (lab.server_ns.clone(), c.ns)
    };
    let left = namespaces();
    assert!(
        !left.contains(&server) && !left.contains(&client),
        "left behind: {left}"
    );
}
