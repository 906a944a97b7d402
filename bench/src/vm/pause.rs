//! `cella-bench vm pause`: how long pause and resume take on a guest spinning at 100% CPU,
//! the worst case for pause (the vCPU never exits on its own). Measured two ways in one run:
//! through the `rpc_interface` contract on the VMM thread (the vCPU state machine alone), and
//! through the control socket with `ControlClient` (what the service sees: connect, HTTP,
//! channel hand-off, answer).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use cella_vmm::control::{action_channel, run_vmm, ApiServer, ControlClient, VmmLimits};
use cella_vmm::rpc_interface::{VmmAction, VmmController};
use cella_vmm::{build, default_runner_image, error_chain, VmConfig};
use clap::Args;
use serde::Serialize;

use super::{figures, Figures};
use crate::exit_code;

#[derive(Debug, Args)]
pub struct PauseBenchArgs {
    /// Pause/resume cycles measured each way
    #[arg(long, default_value_t = 200)]
    pub cycles: usize,
    /// How long the guest runs between a resume and the next pause, in ms
    #[arg(long, default_value_t = 5)]
    pub run_ms: u64,
    /// Print the figures as one JSON object instead of a table
    #[arg(long)]
    pub json: bool,
    /// Guest image [default: the cella-runner that scripts/setup.sh built]
    #[arg(long, value_name = "PATH")]
    pub image: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
struct PauseBench {
    cycles: usize,
    contract_pause: Figures,
    contract_resume: Figures,
    socket_pause: Figures,
    socket_resume: Figures,
}

pub fn main(args: PauseBenchArgs) -> ExitCode {
    match bench(&args) {
        Ok(bench) => {
            if args.json {
                println!("{}", serde_json::to_string(&bench).unwrap_or_default());
            } else {
                print_table(&bench);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cella-bench vm pause: error: {e}");
            ExitCode::from(exit_code::VMM_FAILED)
        }
    }
}

fn config(args: &PauseBenchArgs) -> Result<VmConfig, String> {
    let image = args.image.clone().map(Ok).unwrap_or_else(default_runner_image).map_err(|e| e.to_string())?;
    Ok(VmConfig::new(image, vec!["spin".into()]))
}

/// Times `cycles` pause/resume pairs with `pause` and `resume`, the guest running `run` between.
fn cycle(
    cycles: usize,
    run: Duration,
    mut pause: impl FnMut() -> Result<(), String>,
    mut resume: impl FnMut() -> Result<(), String>,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let (mut paused, mut resumed) = (Vec::with_capacity(cycles), Vec::with_capacity(cycles));
    for _ in 0..cycles {
        std::thread::sleep(run);
        let t = Instant::now();
        pause()?;
        paused.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        resume()?;
        resumed.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((paused, resumed))
}

fn bench(args: &PauseBenchArgs) -> Result<PauseBench, String> {
    let cycles = args.cycles.max(1);
    let run = Duration::from_millis(args.run_ms);

    // Through the contract, on this thread (the library's seccomp default is off).
    let vm = build(&config(args)?, Box::new(std::io::sink())).map_err(|e| error_chain(&e))?;
    let controller = std::cell::RefCell::new(VmmController::new(vm.start().map_err(|e| error_chain(&e))?));
    let call =
        |action: VmmAction| controller.borrow_mut().handle(action).map(|_| ()).map_err(|e| e.to_string());
    let (contract_pause, contract_resume) =
        cycle(cycles, run, || call(VmmAction::Pause), || call(VmmAction::Resume))?;
    call(VmmAction::Stop)?;

    // Through the control socket, with a VMM thread serving it.
    let dir = std::env::temp_dir().join(format!("cella-bench-pause-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let sock = dir.join("api.sock");
    let config = config(args)?;
    let thread_sock = sock.clone();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let vmm = std::thread::spawn(move || -> Result<(), String> {
        let (actions, receiver) = action_channel().map_err(|e| error_chain(&e))?;
        let vm = build(&config, Box::new(std::io::sink())).map_err(|e| error_chain(&e))?;
        let server = ApiServer::start(&thread_sock, actions).map_err(|e| error_chain(&e))?;
        let mut controller = VmmController::new(vm.start().map_err(|e| error_chain(&e))?);
        let _ = ready_tx.send(());
        run_vmm(&mut controller, &receiver, &VmmLimits::default());
        drop(receiver);
        server.shutdown();
        Ok(())
    });
    let result = match ready.recv() {
        Ok(()) => {
            let client = ControlClient::new(&sock);
            let measured = cycle(
                cycles,
                run,
                || client.pause().map_err(|e| e.to_string()),
                || client.resume().map_err(|e| e.to_string()),
            );
            let _ = client.stop();
            measured
        }
        Err(_) => Err("the VMM thread did not start".into()),
    };
    let joined = vmm.join().map_err(|_| "the VMM thread panicked".to_owned()).and_then(|r| r);
    let _ = std::fs::remove_dir_all(&dir);
    let (socket_pause, socket_resume) = result?;
    joined?;
    Ok(PauseBench {
        cycles,
        contract_pause: figures(contract_pause),
        contract_resume: figures(contract_resume),
        socket_pause: figures(socket_pause),
        socket_resume: figures(socket_resume),
    })
}

fn print_table(b: &PauseBench) {
    println!("pause/resume of a guest spinning at 100% CPU, {} cycles each way", b.cycles);
    println!("{:<44} {:>8} {:>8} {:>8} {:>8}", "", "p50 ms", "p99 ms", "mean ms", "min ms");
    let row = |name: &str, f: &Figures| {
        println!("{name:<44} {:>8.3} {:>8.3} {:>8.3} {:>8.3}", f.p50_ms, f.p99_ms, f.mean_ms, f.min_ms)
    };
    row("pause  (contract: request -> vCPU parked)", &b.contract_pause);
    row("resume (contract: request -> vCPU running)", &b.contract_resume);
    row("pause  (control socket, ControlClient)", &b.socket_pause);
    row("resume (control socket, ControlClient)", &b.socket_resume);
}
